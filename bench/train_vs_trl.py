"""DPO training side by side: TRL's DPOTrainer and ``dporm train``, same data, batches, init and config.

Both train SmolLM2-135M-Instruct with LoRA (r 16 on all linear layers, alpha 32), β 0.1, AdamW at a
constant learning rate, clipping 1.0, fp32, no activation checkpointing, on the same batches of
HH-RLHF helpful-base pairs (random order, as TRL's default sampler gives; dporm's length grouping is
switched off so the batches are identical). TRL gets dporm's token ids pre-tokenized
(``bench/trl_dpo_runner.py`` checks every batch), so losses must agree step by step.

Each side runs in its own process; reported: s/step and non-padding tokens/s (both excluding the
first step; prompt tokens counted once per sequence, as TRL runs them), padding share, peak RSS
(VmHWM) and the loss curve. Example:

    .venv/bin/python bench/train_vs_trl.py --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPORM_SIDE = """
import json, sys
from dpo.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({"vmhwm_mib": hwm / 1024}), file=sys.stderr)
sys.exit(rc)
"""


def prepare(args: argparse.Namespace, work: Path) -> tuple[str, int]:
    """Write the chosen batches twice: as text rows for dporm, as token ids for TRL."""
    from dpo.batching import encode_examples
    from dpo.default_model import pull_default_model
    from dpo.models import load_tokenizer
    from dpo.preference_data import load_preferences, load_rows

    model = str(pull_default_model())
    tokenizer = load_tokenizer(model)
    data = load_preferences(args.data, report=lambda msg: None)
    encoded = encode_examples(tokenizer, data.examples, args.max_length, report=lambda msg: None)
    random.Random(args.seed).shuffle(encoded)
    chosen = encoded[: args.steps * args.batch_size]
    raw = load_rows(args.data)
    with (work / "rows.jsonl").open("w") as text, (work / "tokenized.jsonl").open("w") as ids:
        for ex in chosen:
            text.write(json.dumps(raw[ex.row - 1], ensure_ascii=False) + "\n")
            c, r = ex.completions
            ids.write(json.dumps({"prompt_ids": c.prompt_ids, "chosen_ids": c.response_ids,
                                  "rejected_ids": r.response_ids}) + "\n")  # fmt: skip
    return model, sum(ex.tokens for ex in chosen)


def run_trl(args: argparse.Namespace, model: str, work: Path) -> tuple[list[dict], dict]:
    out = work / "trl.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "trl_dpo_runner.py"), "--model", model, "--data",
           str(work / "tokenized.jsonl"), "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr",
           str(args.lr), "--beta", "0.1", "--lora-r", "16", "--lora-alpha", "32", "--seed", str(args.seed),
           "--max-grad-norm", "1.0", "--output", str(out), "--threads", str(args.threads)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return [x for x in lines if not x.get("summary")], next(x for x in lines if x.get("summary"))


def run_dporm(args: argparse.Namespace, model: str, work: Path) -> tuple[list[dict], float]:
    out = work / "dporm-run"
    shutil.rmtree(out, ignore_errors=True)  # a benchmark starts afresh: dporm train refuses an earlier run's output
    cmd = [sys.executable, "-c", DPORM_SIDE, "train", "--model", model, "--data", str(work / "rows.jsonl"),
           "--output", str(out), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lr",
           str(args.lr), "--beta", "0.1", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
           "--warmup-ratio", "0", "--schedule", "constant", "--weight-decay", "0", "--max-grad-norm", "1.0",
           "--seed", str(args.seed), "--no-shuffle", "--max-length", str(args.max_length),
           "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode:
        raise SystemExit(f"dporm train failed ({done.returncode})")
    hwm = json.loads(done.stderr.strip().splitlines()[-1])["vmhwm_mib"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"], hwm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "bench/results/train_vs_trl"))
    args = p.parse_args()
    work = Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    model, _ = prepare(args, work)
    ours, our_hwm = run_dporm(args, model, work)
    trl_steps, trl_summary = run_trl(args, model, work)

    def rate(steps: list[dict], seconds: str, tokens: str) -> tuple[float, float]:
        later = steps[1:]
        return (sum(s[seconds] for s in later) / len(later), sum(s[tokens] for s in later) / sum(s[seconds]
                for s in later))  # fmt: skip

    trl_sps, trl_tps = rate(trl_steps, "step_seconds", "nonpad_tokens")
    our_sps, our_tps = rate(ours, "step_seconds", "tokens")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ours, trl_steps, strict=True)]
    result = {
        "config": vars(args), "trl_version": trl_summary["trl_version"],
        "trl": {"s_per_step": trl_sps, "nonpad_tokens_per_s": trl_tps, "peak_rss_mib": trl_summary["vmhwm_mib"],
                "padding_fraction": trl_summary["padding_fraction"], "losses": [s["loss"] for s in trl_steps]},
        "dporm": {"s_per_step": our_sps, "nonpad_tokens_per_s": our_tps, "peak_rss_mib": our_hwm,
                  "losses": [s["loss"] for s in ours]},
        "speedup": our_tps / trl_tps, "rss_ratio": our_hwm / trl_summary["vmhwm_mib"], "max_loss_diff": max(diffs),
    }  # fmt: skip
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"| | s/step | non-pad tok/s | peak RSS MiB |\n|---|---|---|---|\n"
        f"| TRL {result['trl_version']} | {trl_sps:.1f} | {trl_tps:.1f} | {trl_summary['vmhwm_mib']:.0f} |\n"
        f"| dporm | {our_sps:.1f} | {our_tps:.1f} | {our_hwm:.0f} |\n"
        f"speedup {result['speedup']:.2f}x, RSS ratio {result['rss_ratio']:.2f}, TRL padding "
        f"{trl_summary['padding_fraction']:.0%}, max |loss diff| {max(diffs):.2e}"
    )
    for k, (a, b) in enumerate(zip(ours, trl_steps, strict=True), 1):
        print(f"step {k}: dporm {a['loss']:.6f}  trl {b['loss']:.6f}")
    _plot(result, work / "losses.png")


def _plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, style in (("trl", "o-"), ("dporm", "x--")):
        losses = result[side]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, style, label=side)
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss")
    ax.legend()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
