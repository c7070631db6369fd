"""Training checkpoints: atomic (written to a temp dir, then renamed), the last K kept, exact resume.

A checkpoint ``checkpoints/step-000120/`` holds the trainable weights (``trainable.safetensors``),
``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16), one ``rng-<rank>.pt`` per process and ``state.json``
(step, config). Everything else a run needs is a pure function of the config and the step.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from dpo.errors import DpormError

PREFIX = "step-"


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep: int, scaler=None) -> Path:  # fmt: skip
    """Write step ``step`` (main process); drop all but the newest ``keep``. Returns the final path.

    ``scaler``: fp16's gradient scaler, if any; its scale decides which steps are skipped, so it is saved too."""
    from safetensors.torch import save_file

    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng-0.pt")  # the main process's; other ranks add theirs after the rename
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_rng(checkpoint: Path, rank: int) -> None:
    """The RNG state of process ``rank`` > 0, written into the renamed checkpoint (after a barrier)."""
    tmp = checkpoint / f".rng-{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    tmp.replace(checkpoint / f"rng-{rank}.pt")


def list_checkpoints(output: Path) -> list[Path]:
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, rank: int,
                    scaler=None) -> dict:  # fmt: skip
    """Restore weights, optimizer, scheduler, fp16's gradient scaler and this process's RNG; returns ``state.json``."""
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path / "trainable.safetensors"))
        state = json.loads((path / "state.json").read_text())
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng_file = path / f"rng-{rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise DpormError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    if set(saved) != set(trainable):
        raise DpormError(f"cannot resume from {path}: its trainable weights do not match this model")
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(saved[name])
    if rng is not None:
        set_rng_state(rng)
    return state
