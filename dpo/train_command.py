"""``dporm train``: data, models and reference in; a reward-model artifact (policy + dporm.json) out."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from dpo import __version__
from dpo.batching import encode_examples
from dpo.checkpoints import list_checkpoints, load_checkpoint
from dpo.delta import forward_config
from dpo.errors import DpormError, require_writable
from dpo.file_modes import match_umask
from dpo.manifest import Manifest
from dpo.models import MIXED, PAIRED, load_model, load_tokenizer, resolve_device, resolve_dtype, weights_hash
from dpo.preference_data import Columns, PreferenceData, load_preferences
from dpo.reference import adapter_off_reference, cache_key, model_reference, no_reference, precomputed_reference
from dpo.train_config import PATH_OPTIONS, TrainConfig, build_config
from dpo.train_log import MetricsLog, plot_curves
from dpo.trainer import PolicyScorer, Trainer

# Options that do not change the trained weights: they may differ between a run and its resume.
# Options a resumed run may change; the checkpoint lies in --output, which may have moved or be spelled otherwise.
RESUME_FREE = {"resume", "log_every", "eval_every", "save_every", "keep_checkpoints", "tensorboard", "config",
               "cache_dir", "ref_cache_dir", "output"}  # fmt: skip
OUTPUTS = ("dporm.json", "metrics.jsonl", "checkpoints", "policy")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _columns(c: TrainConfig) -> Columns:
    return Columns(c.prompt_column, c.chosen_column, c.rejected_column, c.responses_column, c.scores_column,
                   c.ranking_column)  # fmt: skip


def _load_data(c: TrainConfig, report) -> tuple[PreferenceData, PreferenceData]:
    train = load_preferences(c.data, _columns(c), c.split, c.strict, report)
    if c.eval_data:
        evaluation = load_preferences(c.eval_data, _columns(c), c.eval_split, c.strict, report)
    else:
        if c.eval_size >= len(train.examples):
            raise DpormError(f"--eval-size {c.eval_size} leaves no training rows ({len(train.examples)} usable)")
        cut = len(train.examples) - c.eval_size
        evaluation = PreferenceData(train.examples[cut:])
        train = PreferenceData(train.examples[:cut], train.skipped)
    if c.loss == "plackett_luce":
        train, evaluation = _strict_rankings(train, report), _strict_rankings(evaluation, report)
    return train, evaluation


def _strict_rankings(data: PreferenceData, report) -> PreferenceData:
    """Plackett–Luce needs a strict order: a ranking with tied scores would be trained in its input order."""
    kept = [ex for ex in data.examples if len(ex.pairs) == len(ex.responses) * (len(ex.responses) - 1) // 2]
    if len(kept) < len(data.examples):
        report(f"skipped {len(data.examples) - len(kept)} ranking(s) with tied scores: --loss plackett_luce needs a "
               "strict order")  # fmt: skip
    return PreferenceData(kept, data.skipped)


def _encode_train(c: TrainConfig, tokenizer, data: PreferenceData, report) -> tuple[list, PreferenceData]:
    """The encoded training examples, the first ``--limit`` that encode, and the rows read to find them."""
    train = encode_examples(tokenizer, data.examples, c.max_length, c.allow_response_truncation, report, c.limit)
    if c.limit and train:  # the fingerprint (resume check, reference cache key) covers the rows read, no more
        read = 1 + next(i for i, ex in enumerate(data.examples) if ex.row == train[-1].row)
        data = PreferenceData(data.examples[:read], data.skipped)
    return train, data


def _check_output(c: TrainConfig, output: Path) -> Path | None:
    """The checkpoint to resume from; refuses to overwrite an earlier run's output."""
    if c.resume:
        if (output / "dporm.json").exists():  # written last: the run finished
            raise DpormError(f"--resume: {output} holds a finished run (its dporm.json is written); nothing to resume")
        found = list_checkpoints(output)
        if not found:
            raise DpormError(f"--resume: no checkpoint under {output / 'checkpoints'}")
        return found[-1]
    if any((output / name).exists() for name in OUTPUTS):
        raise DpormError(f"{output} holds an earlier run; pass --resume to continue it or choose a new --output")
    return None


def _check_resumable(checkpoint: Path, config: TrainConfig) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    saved, saved_paths = state["config"], state.get("paths", {})

    def differs(key: str, value: object) -> bool:
        if key not in PATH_OPTIONS:
            return saved.get(key) != value
        if Path(saved_paths.get(key, "")).is_absolute() and os.path.exists(saved_paths[key]):
            return not _same_path(saved_paths[key], value)  # the file the run read, wherever this shell stands
        return saved.get(key) != value and not _same_path(saved.get(key), value)  # moved, a hub id, or older run

    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUME_FREE and differs(k, v))
    if changed:
        raise DpormError(f"--resume: options differ from the checkpointed run: {', '.join(changed)}")


def _check_same_run(checkpoint: Path, trainer: Trainer) -> None:
    """The data and the process count fix the batches of every step and the schedule, the starting weights what
    the checkpoint's weights and the reference mean: a resume must keep them all."""
    state = json.loads((checkpoint / "state.json").read_text())
    now = {**trainer.run_identity, "total_steps": trainer.schedule.total_steps}
    if state.get("processes", now["processes"]) != now["processes"]:
        raise DpormError(f"--resume: the run trained on {state['processes']} process(es), this one has "
                         f"{now['processes']}; each step's batches depend on it")  # fmt: skip
    if state.get("data_fingerprint", now["data_fingerprint"]) != now["data_fingerprint"]:
        raise DpormError("--resume: the training rows differ from the checkpointed run's (the data file changed)")
    for role, saved in state.get("weights", {}).items():  # absent in checkpoints of older versions
        if saved != now["weights"][role]:
            flag = "--model" if role == "model" else "--reference"
            raise DpormError(f"--resume: the {role}'s weights ({flag}) differ from those the run started from "
                             "(the files were rewritten since)")  # fmt: skip
    if state["total_steps"] != now["total_steps"]:
        raise DpormError(f"--resume: the run planned {state['total_steps']} steps, this one {now['total_steps']}")


def _fit_context(c: TrainConfig, explicit: set[str], paths: set[str]) -> TrainConfig:
    """--max-length within every model's context, where the scorer would cut it (the reward served would then
    differ from the one trained): a default past it is lowered to it, a value given past it is refused."""
    from transformers import AutoConfig

    from dpo.models import context_length

    limits = {}
    for path in sorted(paths):
        try:
            limits[path] = context_length(AutoConfig.from_pretrained(path, trust_remote_code=c.trust_remote_code))
        except (OSError, ValueError):  # no readable config: loading the model reports it
            continue
    path, limit = min(((p, n) for p, n in limits.items() if n is not None), key=lambda x: x[1], default=(None, None))
    if limit is None or c.max_length <= limit:
        return c
    if "max_length" in explicit:
        raise DpormError(f"--max-length {c.max_length} exceeds the context of {path} ({limit} positions); "
                         f"pass --max-length {limit} or less")  # fmt: skip
    _say(f"--max-length {limit}: the model's context (the default {c.max_length} is past it)")
    return dataclasses.replace(c, max_length=limit)


def _same_path(a: str | None, b: str | None) -> bool:
    """Whether two spellings name one existing local file or directory (relative to this working directory)."""
    try:
        return a is not None and b is not None and os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # either is missing here, or a hub id
        return False


def run_train(given: dict) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from dpo.default_model import cache_root
    from dpo.logprobs_command import resolve_model_path

    c, explicit = build_config(given)
    if c.dtype in (MIXED, PAIRED):
        raise DpormError(f"--dtype {c.dtype} is for scoring; train with --mixed-precision bf16 (fp32 master weights)")
    dtype, device = resolve_dtype(c.dtype), resolve_device(c.device)
    if c.mixed_precision == "fp16" and device.type == "cpu":  # accelerate sets up no fp16 autocast on a CPU
        raise DpormError("--mixed-precision fp16 does nothing on a CPU (no fp16 autocast there); use bf16")
    output = Path(c.output).expanduser()
    require_writable(output, parents=True, directory=True)
    if c.ref_cache_dir:
        require_writable(c.ref_cache_dir, "--ref-cache-dir", parents=True, directory=True)
    model_path = resolve_model_path(c.model, c.cache_dir)
    reference_path = None if c.reference_free else (resolve_model_path(c.reference, c.cache_dir)
                                                    if c.reference else model_path)  # fmt: skip
    c = _fit_context(c, explicit, {model_path, reference_path} - {None})  # before the resume check compares it
    resume_from = _check_output(c, output)
    if resume_from is not None:
        _check_resumable(resume_from, c)
    # Buffers (rotary tables) are constants: broadcasting them would make no-grad passes collective.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # AcceleratorState is a process-wide singleton: a second run in one process (library use) with another
    # precision would be refused. The process-group part (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=c.mixed_precision, kwargs_handlers=[ddp])
    if accelerator.distributed_type.value == "DEEPSPEED" and c.grad_accum > 1:
        raise DpormError("--grad-accum conflicts with DeepSpeed: its engine steps at every backward here; "
                         "raise --batch-size or the process count instead")  # fmt: skip
    main = accelerator.is_main_process
    report = _say if main else (lambda msg: None)
    set_seed(c.seed)
    started, clock = time.time(), time.monotonic()

    tokenizer = load_tokenizer(model_path, c.trust_remote_code)
    train_data, eval_data = _load_data(c, report)
    train, train_data = _encode_train(c, tokenizer, train_data, report)
    evaluation = encode_examples(tokenizer, eval_data.examples, c.max_length, c.allow_response_truncation, report)
    if not train:
        raise DpormError("no training example survived encoding (see the skipped rows above)")
    report(f"{len(train)} training and {len(evaluation)} eval examples")

    model = load_model(model_path, c.dtype, str(accelerator.device), c.trust_remote_code, c.allow_pickle)
    separate_reference = reference_path is not None and reference_path != model_path
    ref_model = None
    if separate_reference:
        ref_model = load_model(reference_path, c.dtype, str(accelerator.device), c.trust_remote_code, c.allow_pickle)
    initial_reference = ref_model if separate_reference else model
    ref_hash = weights_hash(initial_reference) if reference_path else None
    # The starting weights, for --resume to refuse a model directory rewritten since (its path alone matches).
    init_hash = ref_hash if reference_path and not separate_reference else weights_hash(model)
    # The reference's forward depends on its config too (rope, norm epsilons): part of the cache key.
    ref_config = forward_config(initial_reference.config.to_dict()) if reference_path else None

    model.train()
    if c.finetune == "lora":
        from dpo.lora import apply_lora

        model = apply_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, c.seed)
    policy = PolicyScorer(model)

    tokenization = {"chat_template": getattr(tokenizer, "chat_template", None), "max_length": c.max_length,
                    "allow_response_truncation": c.allow_response_truncation}  # fmt: skip
    cache_hit, adapter_off = None, None
    if reference_path is None:
        reference = no_reference
    elif separate_reference:
        reference = model_reference(ref_model.requires_grad_(False))
    elif c.finetune == "lora":
        reference = adapter_off = adapter_off_reference(policy)
    elif c.precompute_ref:
        reference = model_reference(model)  # the initial weights, used once before training
    else:
        reference = model_reference(copy.deepcopy(model).eval().requires_grad_(False))
    if c.precompute_ref:
        fingerprint = PreferenceData(train_data.examples + eval_data.examples).fingerprint()
        key = cache_key(fingerprint, ref_hash, {**tokenization, "dtype": str(dtype), "amp": c.mixed_precision,
                                                "config": ref_config})  # fmt: skip
        cache_file = Path(c.ref_cache_dir or cache_root(c.cache_dir) / "ref-logps").expanduser() / f"{key}.safetensors"
        with accelerator.main_process_first(), accelerator.autocast():
            reference, cache_hit = precomputed_reference(reference, train + evaluation, cache_file, c.batch_size,
                                                         show_progress=main)  # fmt: skip
        report(f"reference log-probs {'reused from' if cache_hit else 'cached in'} {cache_file}")
        ref_model = None  # the lookup replaces it; its memory is freed

    log_file = output / "metrics.jsonl"
    if main:
        output.mkdir(parents=True, exist_ok=True)
        metrics_log = MetricsLog(
            log_file,
            output / "tensorboard" if c.tensorboard else None,
            resume_step=None if resume_from is None else int(resume_from.name.split("-")[1]),
            started=clock,
        )

    def log(step: int, metrics: dict, split: str) -> None:
        if main:
            metrics_log.write(step, metrics, split)

    if reference is adapter_off and not c.precompute_ref:
        reference = None  # the trainer runs the policy with its adapter off through the wrapped module
    trainer = Trainer(
        c,
        accelerator,
        policy,
        reference,
        train,
        evaluation,
        log,
        starts_at_reference=reference_path is not None and not separate_reference,
        run_identity={
            "processes": accelerator.num_processes,
            "data_fingerprint": train_data.fingerprint(),
            "weights": {"model": init_hash, "reference": ref_hash},
        },
    )
    start_step = 0
    if resume_from is not None:
        _check_same_run(resume_from, trainer)
        state = load_checkpoint(resume_from, trainer.trainable(), trainer.optimizer, trainer.scheduler,
                                accelerator.process_index, accelerator.scaler)  # fmt: skip
        start_step = state["step"]
        report(f"resuming from {resume_from} (step {start_step} of {trainer.schedule.total_steps})")
    final = trainer.fit(output, start_step)

    if main:
        metrics_log.close()
        adapter = _save_policy(
            accelerator.unwrap_model(trainer.policy).model,
            tokenizer,
            output / "policy",
            keep_adapter=c.finetune == "lora" and not separate_reference and reference_path,
        )
        Manifest(
            policy="policy",
            reference=str(Path(reference_path).resolve()) if reference_path and Path(reference_path).exists()
            else reference_path,
            beta=c.beta,
            adapter=adapter,
            normalize="sum",
            loss=c.loss,
            tokenization=tokenization,
            data_fingerprint=train_data.fingerprint(),
            metrics=final,
            provenance={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dporm_version": __version__,
                        "policy_init": model_path, "reference_weights_hash": ref_hash, "train_examples": len(train),
                        "eval_examples": len(evaluation), "skipped_rows": len(train_data.skipped),
                        "steps": trainer.schedule.total_steps, "processes": accelerator.num_processes,
                        "reference_cache_hit": cache_hit, "wall_seconds": round(time.time() - started, 1),
                        "config": c.to_dict()},
        ).save(output)  # fmt: skip
        plot_curves(log_file, output / "curves.png")
        _summary(final)
        print(output)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


def _save_policy(model, tokenizer, directory: Path, keep_adapter: bool) -> bool:
    """The policy as a PEFT adapter over the reference, or as a full safetensors checkpoint."""
    from dpo.lora import is_peft_model, untie_embeddings

    if is_peft_model(model) and not keep_adapter:  # untied first: a LoRA on a tied head must not merge into both
        model = untie_embeddings(model).merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    match_umask(directory)
    return is_peft_model(model)


def _summary(final: dict) -> None:
    for name, metrics in final.items():
        acc = metrics.get("rewards/accuracies")
        ci = ""
        if "rewards/accuracies_ci95_low" in metrics:
            ci = f" (95% CI {metrics['rewards/accuracies_ci95_low']:.3f}-{metrics['rewards/accuracies_ci95_high']:.3f})"
        _say(
            f"{name}: loss {metrics['loss']:.4f}, reward accuracy {acc:.3f}{ci}, margin "
            f"{metrics['rewards/margins']:.4f}; log π accuracy sum {metrics['logps/accuracies']:.3f}, "
            f"mean {metrics['logps/mean_accuracies']:.3f}"
        )
