"""The reward-model artifact manifest, ``dporm.json``: written by the trainer and ``dporm extract``,
read by the scorer and server, so both sides agree on the reward.

    r(x, y) = beta * (log policy(y|x) - log reference(y|x))     (reference None: reference-free)

``policy`` and ``reference`` are paths relative to the artifact directory, absolute paths
or hub ids; ``adapter`` marks a policy stored as a PEFT adapter over the reference.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpo import __version__
from dpo.errors import DpormError

FILENAME = "dporm.json"
FORMAT_VERSION = 1
NORMALIZATIONS = ("sum", "mean")
# The --dtype choices of every command that loads models (dpo.models.resolve_dtype).
_MIXED_HELP = "log-softmax is always fp32; bf16-mixed: bf16 decoder matmuls, fp32 residual stream and LM head"
ONE_MODEL_DTYPE_HELP = f"fp32 | bf16 | bf16-mixed | fp16 ({_MIXED_HELP})"
DTYPE_HELP = (
    f"fp32 | bf16 | bf16-mixed | bf16-paired | fp16 ({_MIXED_HELP}; bf16-paired: policy and reference in one pass, "
    "the policy as the reference plus an fp32 difference, so bf16 rounding cancels in the reward; Llama-style models)"
)

# bf16-paired's reward errors on RewardBench pairs (full fine-tune of SmolLM2-135M): median 0.07, max 0.53 nats of
# log-ratio per reward. Pairs whose rewards lie within 0.15 nats each of a tie are rescored in float32.
RECHECK_NATS = 0.15


def add_reward_model_options(p, recheck: bool = True) -> None:
    """``--dtype`` (bf16-paired included), ``--recheck``, ``--device``, ``--trust-remote-code``, ``--allow-pickle``:
    how a policy/reference pair is loaded, in score, eval and serve alike."""
    p.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    if recheck:
        add_recheck_argument(p)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights; unsafe")


def add_recheck_argument(p) -> None:
    p.add_argument("--recheck", type=float, default=None, metavar="NATS",
                   help="with --dtype bf16-paired: rescore with the float32 models every pair (group) whose rewards "
                   f"lie within NATS of log-ratio each of a tie (default {RECHECK_NATS:g}; 0 = off)")  # fmt: skip


def resolve_recheck(args) -> None:
    """``args.recheck``: the default tolerance with bf16-paired, 0 otherwise; given with another dtype, an error."""
    from dpo.models import PAIRED

    if args.recheck is None:
        args.recheck = RECHECK_NATS if args.dtype == PAIRED else 0.0
    elif args.dtype != PAIRED:
        raise DpormError(f"--recheck applies to --dtype {PAIRED} only (other precisions have nothing to recheck)")
    elif not (math.isfinite(args.recheck) and args.recheck >= 0):
        raise DpormError(f"--recheck must be a finite number of nats >= 0, got {args.recheck:g}")


@dataclass
class Manifest:
    policy: str
    reference: str | None
    beta: float
    adapter: bool = False
    normalize: str = "sum"
    loss: str | None = None
    tokenization: dict = field(default_factory=dict)  # chat_template, max_length, allow_response_truncation
    data_fingerprint: str | None = None
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise DpormError(f"policy must be a model location (a non-empty string), got {self.policy!r}")
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference):
            raise DpormError(f"reference must be a model location or null, got {self.reference!r}")
        if not is_positive_number(self.beta):
            raise DpormError(f"beta must be a positive finite number, got {self.beta!r}")
        for name in ("tokenization", "metrics", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise DpormError(f"{name} must be an object, got {getattr(self, name)!r}")
        for name in ("loss", "data_fingerprint"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise DpormError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        if not isinstance(self.adapter, bool):
            raise DpormError(f"adapter must be true or false, got {self.adapter!r}")
        _check_tokenization(self.tokenization)
        if self.normalize not in NORMALIZATIONS:
            raise DpormError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.adapter and self.reference is None:
            raise DpormError("an adapter policy needs the reference it adapts")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``dporm.json`` atomically (temp file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.provenance.setdefault("dporm_version", __version__)
        # A fresh name opened O_EXCL with mode 0666: the user's umask applies, as for any file they write
        # (mkstemp's 0600 would keep other accounts from reading the artifact).
        tmp = directory / f".dporm-{uuid.uuid4().hex}.json"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2, ensure_ascii=False)
            f.write("\n")
        target = directory / FILENAME
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise DpormError(f"{directory}: not a dporm artifact (no {FILENAME})")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DpormError(f"{path}: invalid JSON: {getattr(e, 'msg', None) or e.reason}") from None
        if not isinstance(raw, dict):
            raise DpormError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DpormError(f"{path}: format_version {version!r} is not supported (this dporm reads {FORMAT_VERSION})")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise DpormError(f"{path}: unknown fields {', '.join(sorted(unknown))}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise DpormError(f"{path}: {e}") from None
        except DpormError as e:
            raise DpormError(f"{path}: {e}") from None

    def resolve(self, directory: str | os.PathLike, name: str | None) -> str | None:
        """A model location: a path inside the artifact directory or an absolute path (made absolute), or a hub id.

        A relative path resolves against the artifact directory only, never the working directory: a
        missing ``policy`` is an error, not ``./policy``. A hub id (``org/name``, or a legacy one-word id
        such as ``gpt2``) that is not a path inside the artifact stays a hub id; the names dporm gives the
        models it stores inside an artifact (``policy``, ``reference``) never do.
        """
        if name is None:
            return None
        local = Path(directory) / Path(name).expanduser()
        if local.exists() or not HUB_ID.fullmatch(name) or name in STORED_NAMES:
            return str(local.resolve())
        return name


# The hub's repository ids: "org/name", or one word for legacy models (tried inside the artifact first).
HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
STORED_NAMES = ("policy", "reference")  # models that train and extract write inside the artifact


def is_positive_number(value: object) -> bool:
    """A real β: an int or float (not a bool), finite and above 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_tokenization(settings: dict) -> None:
    length = settings.get("max_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 2):
        raise DpormError(f"tokenization.max_length must be an integer of at least 2 or null, got {length!r}")
    template = settings.get("chat_template")
    named = isinstance(template, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in template.items())
    if template is not None and not isinstance(template, str) and not named:  # named: {"default": ..., "tool_use": ...}
        raise DpormError("tokenization.chat_template must be a string, a mapping of names to strings (named "
                         f"templates) or null, got a {type(template).__name__}")  # fmt: skip
    if not isinstance(settings.get("allow_response_truncation", False), bool):
        raise DpormError("tokenization.allow_response_truncation must be true or false")
