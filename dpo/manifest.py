"""The reward-model artifact manifest, ``dporm.json``: written by the trainer and ``dporm extract``,
read by the scorer and server, so both sides agree on the reward.

    r(x, y) = beta * (log policy(y|x) - log reference(y|x))     (reference None: reference-free)

``policy`` and ``reference`` are paths relative to the artifact directory, absolute paths
or hub ids; ``adapter`` marks a policy stored as a PEFT adapter over the reference.
"""

from __future__ import annotations

import json
import os
import tempfile
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
        if not isinstance(self.beta, (int, float)) or self.beta <= 0:
            raise DpormError(f"beta must be a positive number, got {self.beta!r}")
        if self.normalize not in NORMALIZATIONS:
            raise DpormError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.adapter and self.reference is None:
            raise DpormError("an adapter policy needs the reference it adapts")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``dporm.json`` atomically (temp file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.provenance.setdefault("dporm_version", __version__)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dporm-", suffix=".json")
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
        except json.JSONDecodeError as e:
            raise DpormError(f"{path}: invalid JSON: {e.msg}") from None
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

    def resolve(self, directory: str | os.PathLike, name: str | None) -> str | None:
        """A model location as given, made absolute when it is a path inside the artifact directory."""
        if name is None:
            return None
        local = Path(directory) / name
        return str(local.resolve()) if local.exists() else name
