"""``dporm train`` options: one dataclass is the flag list, the config-file schema and the defaults.

Precedence: built-in defaults < config file (YAML, TOML or JSON, keys as in the flags with ``_`` or ``-``)
< flags given on the command line. Conflicting options fail with an error naming both.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from dpo.errors import DpormError, require_at_least

PAIRWISE = ("sigmoid", "robust", "hinge", "ipo", "ipo_sum", "sigmoid_norm")  # dpo.losses.pairwise_loss
LOSSES = (*PAIRWISE, "plackett_luce")
SCHEDULES = ("linear", "cosine", "constant")
FINETUNE = ("lora", "full")
PRECISIONS = ("no", "bf16", "fp16")


def _opt(default, help: str, choices=None, **extra):
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


@dataclass
class TrainConfig:
    # data
    data: str = _opt(None, "preference data: JSONL/JSON/Parquet/CSV (.gz ok), saved dataset dir, or hub id")
    output: str = _opt(None, "output directory: policy, dporm.json, metrics.jsonl, curves.png, checkpoints/")
    model: str = _opt("default", "policy init: model dir or hub id; 'default' = embedded SmolLM2-135M-Instruct")
    split: str = _opt("train", "dataset split (saved dataset dirs and hub ids)")
    eval_data: str = _opt(None, "separate eval data (same formats); default: hold out --eval-size rows of --data")
    eval_split: str = _opt("test", "split of --eval-data")
    eval_size: int = _opt(0, "rows of --data held out for eval (taken from the end, never trained on)")
    limit: int = _opt(None, "use only the first N usable training rows")
    prompt_column: str = _opt("prompt", "column with the prompt (string or chat messages)")
    chosen_column: str = _opt("chosen", "column with the preferred response")
    rejected_column: str = _opt("rejected", "column with the dispreferred response")
    responses_column: str = _opt("responses", "column with a list of responses (rankings)")
    scores_column: str = _opt("scores", "column with per-response scores (rankings; higher is better)")
    ranking_column: str = _opt("ranking", "column with each response's rank, 1 = best (rankings)")
    strict: bool = _opt(False, "fail on the first unusable row instead of skipping it")
    max_length: int = _opt(1024, "max prompt+response tokens; longer prompts are cut from the left")
    allow_response_truncation: bool = _opt(False, "cut over-long responses instead of skipping the row")
    # objective
    loss: str = _opt("sigmoid", "DPO loss", LOSSES)
    beta: float = _opt(0.1, "β: reward scale r = β·(log π − log π_ref)")
    label_smoothing: float = _opt(0.0, "cDPO/robust label noise ε in [0, 0.5) (sigmoid and robust only)")
    # model and reference
    finetune: str = _opt("lora", "lora: train an adapter, reference = base with the adapter off; full: all weights",
                         FINETUNE)  # fmt: skip
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA alpha (scale alpha/r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    lora_targets: str = _opt("all-linear", "LoRA target modules: all-linear or comma-separated names")
    reference: str = _opt(None, "reference model dir or hub id (default: the --model weights)")
    reference_free: bool = _opt(False, "no reference: r = β·log π (SimPO-style ablation)")
    precompute_ref: bool = _opt(False, "compute reference log-probs once, cached on disk and reused across runs")
    ref_cache_dir: str = _opt(None, "reference log-prob cache (default <cache-dir>/ref-logps)")
    # optimisation
    epochs: float = _opt(1.0, "passes over the training data (fractions allowed)")
    max_steps: int = _opt(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = _opt(4, "examples per process per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(5e-6, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "share of steps with linear warmup")
    schedule: str = _opt("linear", "learning-rate decay after warmup", SCHEDULES)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    seed: int = _opt(0, "seed for LoRA init, data order and dropout")
    mixed_precision: str = _opt("no", "autocast precision (accelerate)", PRECISIONS)
    dtype: str = _opt("float32", "weight dtype: fp32 | bf16 | fp16")
    device: str = _opt("auto", "cpu | cuda | auto (under accelerate launch, the process's device)")
    shuffle: bool = _opt(True, "shuffle with length grouping; off = file order, batches as given")
    # logging and checkpoints
    log_every: int = _opt(1, "steps between metric lines")
    eval_every: int = _opt(0, "steps between evals (0 = only before and after training)")
    save_every: int = _opt(0, "steps between checkpoints (0 = none)")
    keep_checkpoints: int = _opt(2, "checkpoints kept (oldest deleted)")
    resume: bool = _opt(False, "continue from the latest checkpoint in --output")
    tensorboard: bool = _opt(False, "also log to TensorBoard (<output>/tensorboard)")
    cache_dir: str = _opt(None, "dporm cache root (default $DPORM_CACHE_DIR or ~/.cache/dporm)")
    trust_remote_code: bool = _opt(False, "run model code shipped with the checkpoint")
    allow_pickle: bool = _opt(False, "also load pickle (.bin) weights; unsafe")
    config: str = _opt(None, "YAML, TOML or JSON file of these options; flags override it")

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are SUPPRESSed so the parsed namespace holds only what was typed."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata["help"] + ("" if default in (None, False) else f" (default {default})")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)  # fmt: skip
            continue
        kind = type(default) if default is not None else (int if f.name in ("limit", "max_steps") else str)
        parser.add_argument(flag, type=kind, choices=f.metadata["choices"], default=argparse.SUPPRESS,
                            metavar=None if f.metadata["choices"] else f.name.upper(), help=help_text)  # fmt: skip


def read_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DpormError(f"{path}: no such config file")
    try:
        if p.suffix == ".toml":
            raw = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(p.read_text()) or {}
        elif p.suffix == ".json":
            raw = json.loads(p.read_text())
        else:
            raise DpormError(f"{path}: config must be .yaml, .yml, .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError, _yaml_error()) as e:
        raise DpormError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DpormError(f"{path}: expected a mapping of option names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS or name == "config":
            raise DpormError(f"{path}: unknown option {key!r}")
        out[name] = value
    return out


def _coerce(name: str, value):
    f = _FIELDS[name]
    default = f.default
    if value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise DpormError(f"option {name}: expected true or false, got {value!r}")
        return value
    kind = type(default) if default is not None else (int if name in ("limit", "max_steps") else str)
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise DpormError(f"option {name}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise DpormError(f"option {name}: expected an integer, got {value!r}")
    if f.metadata["choices"] and out not in f.metadata["choices"]:
        raise DpormError(f"option {name}: {out!r} is not one of {', '.join(f.metadata['choices'])}")
    return out


ALTERNATIVES = (("max_steps", "epochs"), ("eval_data", "eval_size"))  # two ways to set one thing


def build_config(given: dict) -> tuple[TrainConfig, set[str]]:
    """Merge config file and flags; returns the config and the names set explicitly (file or flag)."""
    merged = read_config_file(given["config"]) if given.get("config") else {}
    for pair in ALTERNATIVES:  # a flag overrides the file's alternative to it too (--max-steps over epochs: 1)
        for flag, other in (pair, pair[::-1]):
            if flag in given and other not in given:
                merged.pop(other, None)
    merged.update(given)
    config = TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    explicit = set(merged)
    check_config(config, explicit)
    return config, explicit


def _conflict(a: str, b: str, why: str) -> DpormError:
    return DpormError(f"--{a.replace('_', '-')} conflicts with --{b.replace('_', '-')}: {why}")


def check_config(c: TrainConfig, explicit: set[str]) -> None:
    for name in ("data", "output"):
        if not getattr(c, name):
            raise DpormError(f"--{name} is required (flag or config file)")
    if c.reference_free and "reference" in explicit and c.reference:
        raise _conflict("reference_free", "reference", "a reference-free run has no reference model")
    if c.reference_free and c.precompute_ref:
        raise _conflict("reference_free", "precompute_ref", "there is no reference to precompute")
    if c.label_smoothing and c.loss not in ("sigmoid", "robust"):
        raise _conflict("label_smoothing", "loss", f"label smoothing applies to sigmoid and robust, not {c.loss}")
    if c.finetune == "full":
        lora_set = sorted(n for n in explicit if n.startswith("lora_"))
        if lora_set:
            raise _conflict(lora_set[0], "finetune", "LoRA options need --finetune lora")
    if c.eval_data and c.eval_size:
        raise _conflict("eval_data", "eval_size", "give separate eval data or a held-out size, not both")
    if c.max_steps is not None and "epochs" in explicit:
        raise _conflict("max_steps", "epochs", "choose one way to set the run length")
    if c.mixed_precision != "no" and c.dtype != "float32":
        raise _conflict("mixed_precision", "dtype", "autocast needs float32 master weights")
    positive = ("batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints", "limit", "max_steps")
    require_at_least(c, positive)
    if c.lora_alpha <= 0:
        raise DpormError(f"--lora-alpha must be positive, got {c.lora_alpha:g}")
    for name in ("eval_size", "eval_every", "save_every", "weight_decay", "max_grad_norm", "lora_dropout"):
        if getattr(c, name) < 0:
            raise DpormError(f"--{name.replace('_', '-')} must not be negative")
    for name in ("beta", "lr", "epochs"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) > 0):
            raise DpormError(f"--{name} must be a positive finite number, got {getattr(c, name):g}")
    if not 0 <= c.label_smoothing < 0.5:
        raise DpormError(f"--label-smoothing must be in [0, 0.5), got {c.label_smoothing}")
    if not 0 <= c.warmup_ratio < 1:
        raise DpormError(f"--warmup-ratio must be in [0, 1), got {c.warmup_ratio}")


def _yaml_error() -> type[Exception]:
    try:
        import yaml
    except ImportError:  # no YAML support installed: nothing of that kind can be raised
        return ValueError
    return yaml.YAMLError


PATH_OPTIONS = ("data", "eval_data", "model", "reference")  # equal on --resume when they name one local file


def local_paths(config: TrainConfig) -> dict[str, str]:
    """The absolute paths of the PATH_OPTIONS that name local files or directories, as a checkpoint records them."""
    found = {}
    for key in PATH_OPTIONS:
        value = getattr(config, key)
        if value and Path(value).expanduser().exists():
            found[key] = str(Path(value).expanduser().resolve())
    return found
