"""Offline scoring side by side: RewardBench's ``DPOInference`` and dporm's scorer, same rows, same models.

Scores every chosen/rejected pair of a RewardBench-schema file with a DPO policy and its reference
(default: SmolLM2-135M-Instruct) and reports, in one run on one machine:

    rewardbench   DPOInference.inference_step (PyPI ``rewardbench``, its dpo module only), fp32, per batch size
    dporm fp32    RewardModel.score_groups (the code ``dporm score`` and ``dporm eval`` run) on the same token ids
    dporm bf16    the same with bf16 weights (log-softmax stays fp32)
    bf16-mixed    bf16 decoder matmuls under autocast; residual stream, norms, LM head in fp32
    bf16-paired   both models in one pass, the policy as the reference plus an fp32 difference (dpo.paired);
                  with a LoRA policy (an adapter dir as --policy) it runs from the adapter's factors, as dporm does
    +recheck      the same, then pairs within --recheck nats of a tie rescored by the float32 models, as
                  ``dporm score``/``dporm eval`` do by default (RewardModel.score_groups)
    delta bf16    with --delta-artifact: one bf16 base, the policy as a low-rank adapter (dporm extract)
    dporm own     dporm's own encoding (chat template with generation prompt), fp32

The sides run interleaved: every side scores a chunk of pairs (``--batch-pairs``, at least the
largest RewardBench batch size) before any side scores the next, each timed apart. This VM's speed
drifts by 1.5x within minutes, and sides run one after another would be compared across different
minutes; interleaved, they share them.

Both sides see RewardBench's tokenization (``DPOInference.tokenize_row``), so rewards must agree
(dporm's reward / β vs RewardBench's log-ratio, within 1e-3 in fp32). The reference-log-prob cache
is off: every pair costs both models. Model-FLOP utilisation counts, for every side alike, the
matmul FLOPs the task needs: per pair and model, 2·(linear weights) per fed token (the prompt once,
each response but its last token) and 2·V·H per scored response token; against a GEMM peak sampled
during the side's own minutes. "MFU+attn" also counts attention's score and value matmuls,
4·layers·heads·head_dim per query-key pair the causal mask lets through. Work a side does beyond the
task is not credited: RewardBench runs each prompt twice, pads chosen and rejected to one length and
takes full-vocabulary logits at every position (its "executed" FLOPs are reported beside); the
bf16-paired pass runs 1.5x the task's GEMM FLOPs. Reduced
precision sides report how often the chosen-vs-rejected decision equals fp32's, also by the size of
the fp32 margin (a decision can only flip where the margin is within the rounding error). Example:

    .venv/bin/python bench/score_vs_rewardbench.py --policy runs/uf-full/policy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mfu import TimedSide, gemm_peak, rewardbench_executed_flops, set_mfu, task_flops  # bench/ is on sys.path
from tqdm import tqdm

from dpo.allocator import keep_freed_memory
from dpo.data import read_records
from dpo.default_model import pull_default_model
from dpo.encoding import Encoded
from dpo.lora import is_adapter_dir, load_merged_adapter
from dpo.manifest import RECHECK_NATS
from dpo.models import load_model, load_tokenizer
from dpo.scorer import RewardModel, load_reward_model

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(importlib.util.find_spec("transformers").origin).parents[1]


def load_policy(path: str, reference: str, dtype: str, device: str):
    """The policy as plain weights: a PEFT adapter (``dporm train --finetune lora``) merged into its reference."""
    if is_adapter_dir(path):
        return load_merged_adapter(load_model(reference, dtype, device), path)
    return load_model(path, dtype, device)


def load_dpo_inference():
    """RewardBench's DPOInference, loaded from its file: ``import rewardbench`` fails on transformers 5."""
    spec = importlib.util.spec_from_file_location("rewardbench_dpo", SITE / "rewardbench" / "dpo.py")
    if spec is None or not (SITE / "rewardbench" / "dpo.py").is_file():
        raise SystemExit("rewardbench is not installed: .venv/bin/python -m pip install --no-deps rewardbench==0.1.4")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DPOInference


def rewardbench_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """``prepare_dialogue_from_tokenizer`` for single-turn rows, as RewardBench's run_dpo.py feeds DPOInference."""
    out = []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
        out.append({
            "prompt": render(user),
            "text_chosen": render(user + [{"role": "assistant", "content": r["chosen"]}]),
            "text_rejected": render(user + [{"role": "assistant", "content": r["rejected"]}]),
        })  # fmt: skip
    return out


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad each ``chosen_*``/``rejected_*`` list field (labels with -100), as TRL's DPO collator."""
    batch = {}
    for key in features[0]:
        if not key.startswith(("chosen_", "rejected_")):
            continue
        pad = -100 if key.endswith("labels") else 0 if key.endswith("attention_mask") else pad_id
        width = max(len(f[key]) for f in features)
        batch[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features])
    return batch


@dataclass
class Side:
    """One scorer of the comparison: ``step(start, stop)`` scores ``pairs[start:stop]`` (untimed here)."""

    name: str
    peak: str  # the GEMM peak it is judged against: "fp32" or "bf16"
    step: Callable[[int, int], list[tuple[float, float, bool]]]  # (reward chosen, reward rejected, rechecked)
    flops: tuple[float, float]  # (matmul, attention) FLOPs the task needs, all pairs (task_flops)
    scale: float = 1.0  # reward / scale = log-ratio
    baseline: str | None = None  # the side whose rewards its decisions are compared with
    rewards: list = field(default_factory=list)
    executed: float | None = None  # matmul FLOPs actually run, where they differ from the task's


def rewardbench_step(dpo, features: list[dict], batch_size: int, pad_id: int):
    def step(start: int, stop: int):
        out = []
        with torch.inference_mode():
            for i in range(start, stop, batch_size):
                chosen, rejected = dpo.inference_step(collate(features[i : min(i + batch_size, stop)], pad_id))
                out += [(a, b, False) for a, b in zip(chosen.tolist(), rejected.tolist(), strict=True)]
        return out

    return step


def dporm_step(model: RewardModel, pairs: list[tuple[Encoded, Encoded]], batch_pairs: int, recheck: float = 0):
    """``RewardModel.score_groups``, as ``dporm score`` and ``dporm eval`` run it."""

    def step(start: int, stop: int):
        out = []
        for i in range(start, stop, batch_pairs):
            got = model.score_groups(pairs[i : min(i + batch_pairs, stop)], None, False, False, recheck)
            out += [(a.reward, b.reward, a.rechecked) for a, b in got]
        return out

    return step


def run_interleaved(sides: list[Side], n: int, chunk: int, device: str) -> dict[str, dict]:
    """Every side scores pairs [i, i + chunk) before any scores the next chunk; each is timed by its own TimedSide.

    This VM's speed drifts by 1.5x within minutes; run one after another, sides would be compared across
    different minutes. Each side first scores one chunk untimed (bf16-paired compiles its fused steps there).
    """
    for side in sides:
        warm = time.perf_counter()
        side.step(0, min(chunk, n))
        print(f"    {side.name}: warm-up (one chunk, first call) {time.perf_counter() - warm:.1f} s")
    timers = {side.name: TimedSide(side.peak, device) for side in sides}
    for start in tqdm(range(0, n, chunk), desc="chunks", unit="chunk"):
        for side in sides:
            side.rewards += timers[side.name].run(side.step, start, min(start + chunk, n))
    return {name: timer.finish() for name, timer in timers.items()}


def compat_pairs(feature: dict) -> tuple[Encoded, Encoded]:
    """RewardBench's token ids as dporm sequences: the ``-100`` labels mark the prompt."""
    out = []
    for side in ("chosen", "rejected"):
        ids, labels = feature[f"{side}_input_ids"], feature[f"{side}_labels"]
        n_prompt = sum(x == -100 for x in labels)
        out.append(Encoded(tuple(ids[:n_prompt]), tuple(ids[n_prompt:])))
    return out[0], out[1]


def agreement_by_margin(rewards, baseline) -> dict[str, float]:
    """Share of equal decisions among pairs whose fp32 |margin| (log-ratio units) exceeds each threshold."""
    out = {}
    for threshold in (0.0, 0.1, 0.3, 1.0, 3.0):
        kept = [(x, y) for x, y in zip(rewards, baseline, strict=True) if abs(y[0] - y[1]) > threshold]
        if kept:
            out[f">{threshold}"] = sum((x[0] > x[1]) == (y[0] > y[1]) for x, y in kept) / len(kept)
            out[f">{threshold} pairs"] = len(kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--policy", required=True, help="DPO policy: a full checkpoint dir, or a PEFT adapter dir over --reference"
    )
    p.add_argument("--reference", default="default", help="reference model dir ('default' = SmolLM2-135M-Instruct)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/rewardbench/filtered-sample.jsonl"))
    p.add_argument("--limit", type=int)
    p.add_argument("--rb-batch-sizes", default="1", help="comma-separated DPOInference batch sizes")
    p.add_argument("--batch-pairs", type=int, default=4, help="pairs per dporm scoring call")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU, try --batch-pairs 32 --rb-batch-sizes 1,8)")
    p.add_argument("--delta-artifact", help="also score in bf16 with this dporm extract --delta-rank artifact")
    p.add_argument("--skip", default="", help="comma-separated sides to skip: rewardbench,bf16,mixed,paired,"
                   "recheck,own")  # fmt: skip
    p.add_argument("--recheck", type=float, default=RECHECK_NATS,
                   help="the recheck side's tolerance, nats of log-ratio per reward (dporm's default)")  # fmt: skip
    p.add_argument("--output", default=str(ROOT / "bench/results/score_vs_rewardbench.json"))
    args = p.parse_args()
    keep_freed_memory()  # as the dporm command does (dpo.allocator); every side of the comparison gets it
    skip = set(filter(None, args.skip.split(",")))
    reference = str(pull_default_model()) if args.reference == "default" else args.reference
    tokenizer = load_tokenizer(reference)
    rows = list(read_records(args.data))[: args.limit]
    device = args.device
    peaks = {"fp32": gemm_peak(torch.float32, device), "bf16": gemm_peak(torch.bfloat16, device)}
    print(f"{len(rows)} pairs, {torch.get_num_threads()} threads, GEMM peak fp32 {peaks['fp32']:.0f} "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")  # fmt: skip

    fp32 = {
        "policy": load_policy(args.policy, reference, "float32", device),
        "reference": load_model(reference, device=device),
    }
    DPOInference = load_dpo_inference()
    rb_tok = load_tokenizer(reference)
    rb_tok.pad_token = rb_tok.eos_token  # as run_dpo.py
    dpo = DPOInference(fp32["policy"], fp32["reference"], rb_tok, accelerator=type("A", (), {"device": device})())
    features = [dpo.tokenize_row(r) for r in rewardbench_rows(rb_tok, rows)]
    pairs = [compat_pairs(f) for f in features]
    report: dict = {"pairs": len(rows), "threads": torch.get_num_threads(), "cpu": platform.processor(), "device":
                    torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "sides": {}}  # fmt: skip

    def record(name: str, timing: dict, flops: tuple[float, float], peak: str, rewards, baseline=None,
               executed: float | None = None) -> None:  # fmt: skip
        matmul, attention = flops
        seconds = timing["seconds"]
        entry = {**timing, "pairs_per_s": len(rows) / seconds, "gflop": matmul / 1e9,
                 "attention_gflop": attention / 1e9, "peak": peak, "rewards": rewards}  # fmt: skip
        set_mfu(entry)
        if executed is not None:
            entry["executed_gflop"] = executed / 1e9
            entry["executed_utilisation"] = executed / 1e9 / seconds / entry["peak_gflop_s"]
        if baseline is not None:
            diffs = sorted(
                abs(a - b) for x, y in zip(rewards, baseline, strict=True) for a, b in ((x[0], y[0]), (x[1], y[1]))
            )
            same = sum((x[0] > x[1]) == (y[0] > y[1]) for x, y in zip(rewards, baseline, strict=True))
            margins = sorted(abs(y[0] - y[1]) for y in baseline)
            entry |= {"max_abs_diff": diffs[-1], "median_abs_diff": diffs[len(diffs) // 2],
                      "decisions_equal": same / len(rows), "baseline_median_abs_margin": margins[len(margins) // 2],
                      "decisions_equal_by_margin": agreement_by_margin(rewards, baseline)}  # fmt: skip
        report["sides"][name] = entry
        extra = (
            f"  max|Δ| {entry['max_abs_diff']:.2e} (median {entry['median_abs_diff']:.2e})  same decision "
            f"{entry['decisions_equal']:.1%} (median |margin| {entry['baseline_median_abs_margin']:.3f})"
            if baseline
            else ""
        )
        ran = f", executed {entry['executed_utilisation']:.1%}" if executed is not None else ""
        print(f"{name:<22} {seconds:8.1f} s  {entry['pairs_per_s']:6.3f} pairs/s  MFU {entry['mfu']:6.1%} "
              f"(+attn {entry['mfu_with_attention']:6.1%} of {entry['peak_gflop_s']:.0f}{ran}){extra}")  # fmt: skip
        if baseline:
            print("    same decision where |fp32 margin| >", json.dumps(entry["decisions_equal_by_margin"]))

    sides: list[Side] = []
    rb_sizes = [int(x) for x in args.rb_batch_sizes.split(",")] if "rewardbench" not in skip else []
    for bs in rb_sizes:
        sides.append(Side(f"rewardbench bs={bs}", "fp32", rewardbench_step(dpo, features, bs, rb_tok.pad_token_id),
                          task_flops(fp32["policy"], pairs),
                          executed=rewardbench_executed_flops(fp32["policy"], features, bs)))  # fmt: skip
    rb = "rewardbench bs=*" if rb_sizes else None  # the fastest of them, once timed
    scorer = RewardModel(fp32["policy"], fp32["reference"], tokenizer, args.beta, ref_cache_size=0)
    sides.append(Side("dporm fp32", "fp32", dporm_step(scorer, pairs, args.batch_pairs),
                      task_flops(fp32["policy"], pairs), args.beta, rb))  # fmt: skip
    if "own" not in skip:
        own = [tuple(scorer.encode(r["prompt"], r[k]) for k in ("chosen", "rejected")) for r in rows]
        sides.append(Side("dporm fp32 own-encoding", "fp32", dporm_step(scorer, own, args.batch_pairs),
                          task_flops(fp32["policy"], own), args.beta))  # fmt: skip
    for side, dtype in (("bf16", "bf16"), ("mixed", "bf16-mixed"), ("paired", "bf16-paired")):
        if side in skip:
            continue
        if dtype == "bf16-paired" and is_adapter_dir(args.policy):  # as dporm runs it: the adapter's own factors
            low = load_reward_model(policy=args.policy, reference=reference, beta=args.beta, dtype=dtype,
                                    device=device, ref_cache_size=0)  # fmt: skip
        elif dtype == "bf16-paired":  # bf16 copies of the linear weights beside the fp32 models it keeps
            low = RewardModel(fp32["policy"], fp32["reference"], tokenizer, args.beta, ref_cache_size=0, paired=True)
        else:
            pair_models = load_policy(args.policy, reference, dtype, device), load_model(reference, dtype, device)
            low = RewardModel(*pair_models, tokenizer, args.beta, ref_cache_size=0)
        flops = task_flops(low.policy, pairs)
        sides.append(Side(f"dporm {dtype}", "bf16", dporm_step(low, pairs, args.batch_pairs), flops, args.beta,
                          "dporm fp32"))  # fmt: skip
        if dtype == "bf16-paired" and "recheck" not in skip:  # the same model; close pairs rescored in float32
            sides.append(Side(f"dporm bf16-paired recheck {args.recheck:g}", "bf16",
                              dporm_step(low, pairs, args.batch_pairs, args.recheck), flops, args.beta,
                              "dporm fp32"))  # fmt: skip
    if args.delta_artifact:
        # One bf16 base serves π (adapter on) and π_ref (adapter off): both see the same rounded weights.
        delta = load_reward_model(args.delta_artifact, dtype="bf16", device=device, ref_cache_size=0)
        sides.append(Side("dporm bf16 delta artifact", "bf16", dporm_step(delta, pairs, args.batch_pairs),
                          task_flops(delta.policy, pairs), delta.beta, "dporm fp32"))  # fmt: skip

    chunk = max([args.batch_pairs, *rb_sizes])
    print(f"{len(sides)} sides, interleaved {chunk} pairs at a time")
    timings = run_interleaved(sides, len(pairs), chunk, device)
    logratios = {side.name: [(a / side.scale, b / side.scale) for a, b, _ in side.rewards] for side in sides}
    if rb:
        rb = min((n for n in timings if n.startswith("rewardbench")), key=lambda n: timings[n]["seconds"])
    for side in sides:
        rechecked = sum(r for _, _, r in side.rewards)
        if rechecked:
            print(f"    {side.name}: {rechecked} pair(s) within {args.recheck:g} nats of a tie rescored in float32")
        baseline = rb if side.baseline == "rewardbench bs=*" else side.baseline
        record(side.name, timings[side.name] | {"rechecked": rechecked}, side.flops, side.peak,
               logratios[side.name], logratios[baseline] if baseline else None, side.executed)  # fmt: skip
    rb_best = rb
    after = {"fp32": gemm_peak(torch.float32, device), "bf16": gemm_peak(torch.bfloat16, device)}
    report["gemm_peak_readings"] = {"before": dict(peaks), "after": after}
    print(f"GEMM peak after: fp32 {after['fp32']:.0f} bf16 {after['bf16']:.0f} GFLOP/s (MFU uses each side's samples)")
    if rb_best:
        for side in report["sides"].values():
            side["speedup_vs_rewardbench_best"] = report["sides"][rb_best]["seconds"] / side["seconds"]
        print("speedups vs " + rb_best + ": " + ", ".join(
            f"{k} {v['speedup_vs_rewardbench_best']:.2f}x" for k, v in report["sides"].items()))  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
