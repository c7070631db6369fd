"""Summaries of scored rows for ``dporm eval``: results dicts, ``results.json``, PNGs and the terminal table."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from dpo.eval_metrics import (
    best_of_n_result,
    calibration,
    rewardbench2_scores,
    rewardbench_scores,
    subset_accuracies,
    ties_score,
)
from dpo.eval_plots import margins_png, reliability_png
from dpo.eval_runner import Row, is_scored
from dpo.trainer import wilson_interval


def _with_ci(stats: dict) -> dict:
    low, high = wilson_interval(stats["correct"], stats["n"])
    return {**stats, "ci95": [low, high]}


def rewardbench_report(rows: Sequence[Row], records: dict[int, dict], output: Path) -> dict:
    """Per row: margin = r_chosen − r_rejected, correct iff margin > 0 (ties are wrong)."""
    ok = [records[r.key] for r in rows if is_scored(records[r.key])]
    margins = [rec["scores"][0] - rec["scores"][1] for rec in ok]
    subsets = [rec["subset"] for rec in ok]
    per_subset = subset_accuracies(subsets, [m > 0 for m in margins])
    by_subset: dict[str, list[float]] = defaultdict(list)
    for s, m in zip(subsets, margins, strict=True):
        by_subset[s].append(m)
    for s, stats in per_subset.items():
        stats.update(ties=sum(m == 0 for m in by_subset[s]), mean_margin=sum(by_subset[s]) / len(by_subset[s]))
        per_subset[s] = _with_ci(stats)
    scores = rewardbench_scores({s: v["accuracy"] for s, v in per_subset.items()})
    cal = calibration(margins)
    if margins:
        margins_png(by_subset, output / "margins.png")
        reliability_png(cal, output / "reliability.png")
    correct = sum(m > 0 for m in margins)
    return {
        "benchmark": "rewardbench",
        "subsets": per_subset,
        **scores,
        "accuracy": _with_ci({"n": len(margins), "correct": correct, "accuracy": correct / max(len(margins), 1)}),
        "ties": sum(m == 0 for m in margins),
        "truncated_rows": sum(any(rec["truncated"]) for rec in ok),
        "calibration": cal,
    }


def rewardbench2_report(rows: Sequence[Row], records: dict[int, dict], output: Path) -> dict:
    """Non-Ties subsets: mean of the best-of-N row results; Ties: RewardBench 2's weighted score."""
    ok = [records[r.key] for r in rows if is_scored(records[r.key])]
    results, subsets, ties_rows = [], [], []
    by_subset: dict[str, list[float]] = defaultdict(list)
    for rec in ok:
        scores, k = rec["scores"], rec["num_correct"]
        by_subset[rec["subset"]].append(min(scores[:k]) - max(scores[k:]))
        if rec["subset"].lower() == "ties":
            ties_rows.append((rec["id"], scores, k))
            continue
        results.append(best_of_n_result(scores))
        subsets.append(rec["subset"])
    per_subset = subset_accuracies(subsets, results)
    for stats in per_subset.values():
        stats["score"] = stats["accuracy"]
    if ties_rows:
        parts = ties_score(ties_rows)
        per_subset["Ties"] = {"n": len(ties_rows), **parts}
    overall = rewardbench2_scores({s: v["score"] for s, v in per_subset.items()})
    if by_subset:
        margins_png(by_subset, output / "margins.png", "worst chosen − best rejected")
    truncated = sum(any(rec["truncated"]) for rec in ok)
    return {"benchmark": "rewardbench2", "subsets": per_subset, **overall, "truncated_rows": truncated}


def pairs_report(rows: Sequence[Row], records: dict[int, dict], output: Path) -> dict:
    """Accuracy over all (winner, loser) pairs with a 95% Wilson CI, and calibration of σ(margin)."""
    margins, truncated = [], 0
    for row in rows:
        rec = records[row.key]
        if is_scored(rec):
            margins += [rec["scores"][w] - rec["scores"][lo] for w, lo in rec["pairs"]]
            truncated += any(rec["truncated"])
    correct = sum(m > 0 for m in margins)
    cal = calibration(margins)
    if margins:
        margins_png({"pairs": margins}, output / "margins.png")
        reliability_png(cal, output / "reliability.png")
    return {
        "benchmark": "pairs",
        "accuracy": _with_ci({"n": len(margins), "correct": correct, "accuracy": correct / max(len(margins), 1)}),
        "ties": sum(m == 0 for m in margins),
        "mean_margin": sum(margins) / max(len(margins), 1),
        "truncated_rows": truncated,
        "calibration": cal,
    }


REPORTS = {"rewardbench": rewardbench_report, "rewardbench2": rewardbench2_report, "pairs": pairs_report}


def write_results(results: dict, output: Path) -> None:
    path = output / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


def print_table(results: dict) -> None:
    lines = [f"{'subset':<24} {'n':>5} {'score':>8}"]
    for name, s in results.get("subsets", {}).items():
        lines.append(f"{name:<24} {s['n']:>5} {_fmt(s.get('score', s.get('accuracy'))):>8}")
    for name, value in results.get("sections", {}).items():
        lines.append(f"{'[' + name + ']':<24} {'':>5} {_fmt(value):>8}")
    if results.get("prior_sets") is not None:
        lines.append(f"{'[Prior Sets]':<24} {'':>5} {_fmt(results['prior_sets']):>8}")
    if "overall" in results:
        flag = " (partial: some subsets missing)" if results.get("partial") else ""
        lines.append(f"{'overall':<24} {'':>5} {_fmt(results['overall']):>8}{flag}")
    if "accuracy" in results:
        a = results["accuracy"]
        lines.append(f"accuracy {a['accuracy']:.4f} (95% CI {a['ci95'][0]:.4f}-{a['ci95'][1]:.4f}, "
                     f"{a['correct']}/{a['n']}, ties {results['ties']})")  # fmt: skip
    if results.get("calibration", {}).get("ece") is not None:
        lines.append(f"ECE {results['calibration']['ece']:.4f} (σ(r_chosen − r_rejected), symmetrised)")
    if results.get("truncated_rows"):
        whose = "the server's own" if results["model"].get("servers") else "see --max-length"
        lines.append(f"{results['truncated_rows']} row(s) cut to max_length={results['model'].get('max_length')} "
                     f"({whose})" if not results["config"]["rewardbench_compat"] else
                     f"{results['truncated_rows']} row(s) cut by RewardBench's 2048/128 rule")  # fmt: skip
    t, d = results["timings"], results["data"]
    if d.get("rechecked"):
        tolerance = results["model"].get("recheck")
        lines.append(f"{d['rechecked']} close row(s) rescored in float32 (--recheck {tolerance:g})")
    lines.append(f"rows {d['scored']}/{d['rows']} scored ({d['failed']} failed, {d['skipped']} skipped); "
                 f"{t['score_seconds']:.1f} s scoring, {t['rows_per_second']:.2f} rows/s")  # fmt: skip
    print("\n".join(lines))
