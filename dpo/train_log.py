"""Training metrics: one JSON line per logged step (``metrics.jsonl``), optional TensorBoard,
and ``curves.png`` at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dpo.errors import DpormError

CURVES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")


class MetricsLog:
    """Appends ``{"step", "split", **metrics, "seconds"}`` lines, ``seconds`` since ``started`` (a
    ``time.monotonic()`` reading: when the run started; default now). On resume, lines after ``resume_step``
    (written by the interrupted run after its last checkpoint) are dropped first, and ``seconds`` goes on from
    the last line kept (time spent stopped is not counted)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, resume_step: int | None = None,
                 started: float | None = None):  # fmt: skip
        self.path, self.started, self.offset = path, time.monotonic() if started is None else started, 0.0
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [json.loads(line) for line in path.read_text().splitlines()]
            kept = [row for row in kept if row["step"] <= resume_step]
            path.write_text("".join(json.dumps(row) + "\n" for row in kept))
            # Older logs timed only evals, under "seconds": their train lines lack it, and count nothing then.
            if all("seconds" in row for row in kept):
                self.offset = max((row["seconds"] for row in kept), default=0.0)
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DpormError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        with self.path.open("a") as f:
            seconds = self.offset + time.monotonic() - self.started
            f.write(json.dumps({"step": step, "split": split, **metrics, "seconds": seconds}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_file: Path, png: Path) -> None:
    """Train and eval curves of :data:`CURVES` against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, name in zip(axes.flat, CURVES, strict=True):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=split, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.savefig(png, dpi=100)
    plt.close(fig)
