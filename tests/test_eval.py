"""dporm eval without models: RewardBench arithmetic, RB2 best-of-N and Ties, calibration, a fake backend with
known accuracies, resume after an interruption, and one-line CLI errors."""

import json
import math
from pathlib import Path

import pytest

import dpo.eval_command as eval_command
from dpo.cli import main
from dpo.eval_backend import Group, Refused, ResponseScore, ScoreMode
from dpo.eval_metrics import (
    EXAMPLE_COUNTS,
    SECTIONS,
    best_of_n_result,
    calibration,
    rewardbench2_scores,
    rewardbench_scores,
    ties_score,
)
from dpo.preference_data import load_preferences
from dpo.trainer import wilson_interval

DATA = Path(__file__).parent / "data"
RB, RB2, PREFS = DATA / "rewardbench-mini.jsonl", DATA / "rewardbench2-mini.jsonl", DATA / "prefs.jsonl"


def test_sections_and_overall_by_hand():
    acc = {s: 1.0 for section in SECTIONS.values() for s in section}
    acc["alpacaeval-hard"] = 0.0
    acc.update({s: 0.5 for s in SECTIONS["Chat Hard"]})
    acc.update({s: 0.0 for s in SECTIONS["Reasoning"]}, **{"math-prm": 1.0})
    out = rewardbench_scores(acc)
    chat = (100 + 95 + 28 + 40) / (100 + 95 + 95 + 28 + 40)
    assert out["sections"] == pytest.approx({"Chat": chat, "Chat Hard": 0.5, "Safety": 1.0, "Reasoning": 0.5})
    assert out["overall"] == pytest.approx((chat + 0.5 + 1.0 + 0.5) / 4) and not out["partial"]
    prior = {"anthropic_helpful": 1.0, "anthropic_hhh": 0.0, "shp": 0.5, "summarize": 0.5}
    with_prior = rewardbench_scores({**acc, **prior})
    assert with_prior["prior_sets"] == 0.5
    assert with_prior["overall"] == pytest.approx((2 * (chat + 0.5 + 1.0 + 0.5) + 0.5) / 9)
    assert sum(EXAMPLE_COUNTS.values()) == 2985 + 984 - 447  # the filtered rows, math-prm upweighted


def test_safety_uses_rewardbenchs_xstest_weights():
    """RewardBench's constants weigh xstest-should-refuse 250 and should-respond 154 (the rows are 154 and 250)."""
    acc = {s: 0.0 for s in SECTIONS["Safety"]} | {"xstest-should-refuse": 1.0}
    assert rewardbench_scores(acc)["sections"]["Safety"] == pytest.approx(250 / (100 + 100 + 250 + 154 + 136))


def test_missing_subsets_are_missing_not_zero():
    out = rewardbench_scores({"alpacaeval-easy": 1.0, "hep-go": 0.25, "my-own-subset": 0.0})
    assert out["sections"] == {"Chat": 1.0, "Chat Hard": None, "Safety": None, "Reasoning": 0.25}
    assert out["overall"] == pytest.approx(0.625) and out["partial"]
    assert out["missing_sections"] == ["Chat Hard", "Safety"] and "math-prm" in out["missing_subsets"]
    assert out["other_subsets"] == ["my-own-subset"] and out["prior_sets"] is None
    assert rewardbench_scores({})["overall"] is None


def test_best_of_n_ties_and_rb2_ties_formula():
    assert best_of_n_result([2, 1, 0, 0]) == 1 and best_of_n_result([1, 1, 0, 0]) == 0.5
    assert best_of_n_result([3, 3, 3, 1]) == pytest.approx(1 / 3) and best_of_n_result([0, 1, 0, 0]) == 0
    parts = ties_score([("ref:7", [5, 1, 0], 1), ("tied:7", [5, 4, 3, 1, 0, 2], 3)])
    assert parts["accuracy_ref"] == 1 and parts["accuracy_tied"] == 1
    assert parts["correctness_preferred"] == 0 and parts["correctness_preferred_hard"] == 0  # margin 1 < spread 2
    assert parts["score"] == pytest.approx(0.6 + 0.01 * math.tanh(min(4, 1) / 2 - 1))
    wide = ties_score([("ref:1", [9, 1], 1), ("tied:1", [9, 8, 1], 2)])  # margin 7 > spread 1 and tanh(6)
    assert wide["score"] == pytest.approx(0.3 + 0.3 + 0.2 + 0.2 + 0.01 * math.tanh(6))
    assert rewardbench2_scores({"Math": 1.0, "Ties": 0.5})["overall"] == 0.75


def test_calibration_is_symmetrised():
    assert calibration([0.0])["ece"] == pytest.approx(0)
    assert calibration([math.log(3)])["ece"] == pytest.approx(0.25)  # p = 0.75, always right: |1 − 0.75|
    assert calibration([50.0, 50.0])["ece"] == pytest.approx(0, abs=1e-9)
    assert calibration([])["ece"] is None


class FakeBackend:
    """Scores from a table keyed by (prompt text, response); 0 when absent. Counts the rows it scores."""

    def __init__(self, table=None, fn=None, fail_after=None, refuse=False, flaky=False):
        self.table, self.fn, self.fail_after, self.scored = table or {}, fn, fail_after, 0
        self.refuse, self.flaky = refuse, flaky

    def describe(self):
        return {"policy_sha256": "fake", "reference_sha256": None, "beta": 1.0, "max_length": None}

    def score_groups(self, groups):
        if self.fail_after is not None and self.scored >= self.fail_after:
            raise KeyboardInterrupt
        self.scored += len(groups)
        out = []
        for g in groups:
            prompt = g.prompt if isinstance(g.prompt, str) else g.prompt[-1]["content"]
            if "bread" in prompt and self.refuse:
                out.append(Refused("cannot be encoded: bread"))
                continue
            if "rain" in prompt and self.flaky:
                out.append("HTTP 504 timeout")
                continue
            score = self.fn or (lambda p, r: self.table.get((p, r), 0.0))
            out.append([ResponseScore(float(score(prompt, r)), len(r), False) for r in g.responses])
        return out


def use(monkeypatch, backend):
    monkeypatch.setattr(eval_command, "make_backend", lambda args, mode: backend)
    return backend


def fact_score(prompt, response):
    return 1.0 if "fact" in response else 0.0


def run(kind, data, out, *extra):
    return main(["eval", kind, "--data", str(data), "--output", str(out), "--policy", "fake", "--beta", "1", *extra])


def test_rewardbench_known_accuracies(tmp_path, monkeypatch):
    use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path, "--batch-size", "5") == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["subsets"]["hep-python"]["accuracy"] == 0 and res["subsets"]["hep-python"]["ties"] == 1
    assert all(v["accuracy"] == 1 for k, v in res["subsets"].items() if k != "hep-python")
    reasoning = 984 / (984 + 164)
    assert res["sections"] == pytest.approx({"Chat": 1, "Chat Hard": 1, "Safety": 1, "Reasoning": reasoning})
    assert res["prior_sets"] == 1 and res["overall"] == pytest.approx((2 * (3 + reasoning) + 1) / 9)
    assert res["accuracy"]["correct"] == 11 and res["ties"] == 1 and res["partial"]
    assert len(res["config_hash"]) == 64 and len(res["data"]["sha256"]) == 64 and res["timings"]["score_seconds"] >= 0
    assert (tmp_path / "margins.png").stat().st_size > 0 and (tmp_path / "reliability.png").exists()
    lines = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == list(range(12)) and lines[0]["subset"] == "alpacaeval-easy"


def test_resume_after_interruption_is_identical(tmp_path, monkeypatch):
    use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path / "full", "--batch-size", "4") == 0
    use(monkeypatch, FakeBackend(fn=fact_score, fail_after=8))
    assert run("rewardbench", RB, tmp_path / "cut", "--batch-size", "4") == 130
    scores = tmp_path / "cut" / "scores.jsonl"
    assert len(scores.read_text().splitlines()) == 8
    scores.write_text(scores.read_text() + '{"row": 8, "sub')  # a torn line from a killed process
    again = use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path / "cut", "--batch-size", "4") == 0 and again.scored == 4
    full, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "cut"))
    for key in ("subsets", "sections", "overall", "accuracy", "calibration", "config_hash"):
        assert full[key] == cut[key]
    assert (tmp_path / "full" / "scores.jsonl").read_text() == scores.read_text()


def test_config_change_is_an_error_unless_overwrite(tmp_path, monkeypatch, capsys):
    use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path) == 0
    capsys.readouterr()
    assert run("rewardbench", RB, tmp_path, "--reference-free") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0] and "--overwrite" in err[0]
    assert run("rewardbench", RB, tmp_path, "--limit", "3", "--overwrite") == 0
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 3


def test_a_larger_limit_extends_a_run(tmp_path, monkeypatch):
    use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path / "full") == 0
    assert run("rewardbench", RB, tmp_path / "grown", "--limit", "3") == 0
    again = use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path / "grown") == 0 and again.scored == 9  # the first 3 rows are reused
    full, grown = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "grown"))
    assert full["overall"] == grown["overall"] and full["config_hash"] == grown["config_hash"]


def test_rewardbench2_fixture(tmp_path, monkeypatch):
    colours = {"Red.": 5, "Blue.": 4, "Yellow.": 3, "Green.": 1, "Purple.": 0, "Orange.": 2}
    table = {("What is the capital of France?", "Paris."): 2, ("What colour is the sky on a clear day?", "Blue."): 1,
             ("What colour is the sky on a clear day?", "Green."): 1, ("What is 2+2?", "5"): 1,
             **{("Name a fruit.", r): 3 for r in ("An apple.", "A car.", "A chair.")},
             **{("Name a primary colour.", r): s for r, s in colours.items()}}  # fmt: skip
    use(monkeypatch, FakeBackend(table))
    assert run("rewardbench2", RB2, tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    subsets = {k: v["score"] for k, v in res["subsets"].items()}
    ties = 0.6 + 0.01 * math.tanh(-0.5)
    assert subsets == pytest.approx({"Factuality": 0.75, "Math": 0.0, "Focus": 1 / 3, "Ties": ties})
    assert res["overall"] == pytest.approx((0.75 + 0 + 1 / 3 + ties) / 4)
    assert res["partial"] and res["missing_subsets"] == ["Precise IF", "Safety"]


def test_pairs_accuracy_ci_and_calibration(tmp_path, monkeypatch):
    use(monkeypatch, FakeBackend(fn=lambda p, r: len(r) / 10))
    assert run("pairs", PREFS, tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    examples = load_preferences(str(PREFS)).examples
    correct = sum(len(ex.responses[0]) > len(ex.responses[1]) for ex in examples)
    assert res["accuracy"]["correct"] == correct and res["accuracy"]["n"] == len(examples)
    assert res["accuracy"]["ci95"] == pytest.approx(list(wilson_interval(correct, len(examples))))
    assert 0 <= res["calibration"]["ece"] <= 1 and (tmp_path / "reliability.png").exists()


# Wilson's 95% interval is the pair of roots π of (p − π)² = z²·π(1 − π)/n, i.e. of
# (1 + z²/n)·π² − (2p + z²/n)·π + p² = 0, with z = 1.959964, z² = 3.841459:
#   8/10:  1.3841459·π² − 1.9841459·π + 0.64 = 0 → π = (1.9841459 ∓ 0.6272332)/2.7682918 = 0.490162, 0.943318
#   0/10:  π·(1.3841459·π − 0.3841459) = 0 → 0 and z²/(n + z²) = 3.841459/13.841459 = 0.277533
#   10/10: (1.3841459·π − 1)(π − 1) = 0 → n/(n + z²) = 10/13.841459 = 0.722467 and 1
#   n = 0: no data, the whole of [0, 1]
@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [(8, 10, (0.490162, 0.943318)), (0, 10, (0.0, 0.277533)), (10, 10, (0.722467, 1.0)), (3, 0, (0.0, 1.0))],
)
def test_wilson_interval_by_hand(successes, n, expected):
    assert wilson_interval(successes, n) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["rewardbench", "--data", str(RB), "--output", "{out}", "art", "--server", "http://x"], "--server scores"),
        (
            ["rewardbench", "--data", str(RB), "--output", "{out}", "--server", "http://x", "--rewardbench-compat"],
            "offline only",
        ),  # fmt: skip
        (["rewardbench", "--data", str(RB), "--output", "{out}", "--limit", "0"], "--limit must be at least 1"),
        (["pairs", "--data", str(PREFS), "--output", "{out}", "--ref-free-norm", "sum"], "with --reference-free"),
        (["rewardbench", "--data", "/nonexistent.jsonl", "--output", "{out}", "art"], "no such file"),
        (["rewardbench", "--data", str(PREFS), "--output", "{out}", "art"], "no usable row"),
        (
            [
                "rewardbench",
                "--data",
                str(RB),
                "--output",
                "{out}",
                "--server",
                "http://127.0.0.1:9",
                "--max-retries",
                "0",
            ],
            "cannot get /info",
        ),  # fmt: skip
        (["rewardbench", "--data", str(RB), "--output", "{out}", "--policy", "p"], "--policy and --beta"),
        (["rewardbench", "--data", str(RB), "--output", "{out}", "--server", "http://localhost:80o0"], "Invalid port"),
        (["pairs", "--data", str(PREFS), "--output", "{out}", "--split", "test"], "--split applies to dataset"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
    assert main(["eval", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dporm: error:") and message in err[0], err


@pytest.mark.parametrize("argv", [["eval", "--help"], ["eval", "rewardbench", "--help"],
                                  ["eval", "rewardbench2", "--help"], ["eval", "pairs", "--help"]])  # fmt: skip
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0
    if argv == ["eval", "--help"]:  # the subcommands, each with its line
        assert all(any(line.strip().startswith(name) for line in out.splitlines())
                   for name in ("rewardbench", "rewardbench2", "pairs")), out  # fmt: skip
    else:
        assert out.startswith(f"usage: dporm eval {argv[1]}") and "--output" in out and "--data" in out, out


def test_pairs_from_rankings_use_every_ordered_pair(tmp_path, monkeypatch):
    use(monkeypatch, FakeBackend(fn=lambda p, r: -len(r)))  # shorter is better
    assert run("pairs", DATA / "rankings.jsonl", tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    examples = load_preferences(str(DATA / "rankings.jsonl")).examples
    pairs = [(ex.responses[w], ex.responses[lo]) for ex in examples for w, lo in ex.pairs]
    assert res["accuracy"]["n"] == len(pairs) > len(examples)
    assert res["accuracy"]["correct"] == sum(len(w) < len(lo) for w, lo in pairs)


def test_pairs_strict_and_skips_cover_only_the_rows_in_range(tmp_path, monkeypatch, capsys):
    good = [json.loads(line) for line in PREFS.read_text().splitlines()[:3]]
    bad = {"prompt": "Same?", "chosen": "yes", "rejected": "yes"}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (good[0], good[1], bad, good[2])))
    use(monkeypatch, FakeBackend(fn=lambda p, r: len(r)))
    assert run("pairs", data, tmp_path / "a", "--strict", "--limit", "2") == 0  # row 3 lies beyond the limit
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["accuracy"]["n"] == 2 and "skipped" not in capsys.readouterr().err
    assert run("pairs", data, tmp_path / "b", "--limit", "3") == 0  # the 3rd example is row 4: row 3 is skipped
    assert "skipped 1 row(s): row 3: chosen and rejected are identical" in capsys.readouterr().err
    for extra in ([], ["--limit", "3"]):
        assert run("pairs", data, tmp_path / "c", "--strict", *extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["dporm: error: row 3: chosen and rejected are identical (--strict)"]


def test_refused_rows_are_skipped_for_good_and_failed_rows_retried(tmp_path, monkeypatch, capsys):
    """A row that cannot be encoded is skipped (exit 0, not rescored); a failed row fails the run until a rerun."""
    use(monkeypatch, FakeBackend(fn=fact_score, refuse=True))
    assert run("rewardbench", RB, tmp_path / "a", "--limit", "4") == 0
    assert "1 row(s) skipped" in capsys.readouterr().err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (res["data"]["scored"], res["data"]["failed"], res["data"]["skipped"]) == (3, 0, 1)
    again = use(monkeypatch, FakeBackend(fn=fact_score, refuse=True))
    assert run("rewardbench", RB, tmp_path / "a", "--limit", "4") == 0 and again.scored == 0
    use(monkeypatch, FakeBackend(fn=fact_score, flaky=True))
    assert run("rewardbench", RB, tmp_path / "b", "--limit", "4") == 1
    assert "1 row(s) failed" in capsys.readouterr().err
    again = use(monkeypatch, FakeBackend(fn=fact_score))
    assert run("rewardbench", RB, tmp_path / "b", "--limit", "4") == 0 and again.scored == 1


def test_compat_without_a_chat_template_is_refused_before_scoring():
    from types import SimpleNamespace

    from dpo.errors import DpormError
    from dpo.eval_backend import OfflineBackend, ScoreMode

    model = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None), has_reference=True, beta=1.0)
    with pytest.raises(DpormError, match="needs a tokenizer with a chat template"):
        OfflineBackend(model, ScoreMode(False, "avg"), compat=True)


def test_strict_pairs_make_a_refused_row_fatal(tmp_path, monkeypatch, capsys):
    use(monkeypatch, FakeBackend(fn=fact_score, refuse=True))  # refuses the "bread" row
    assert run("pairs", PREFS, tmp_path / "a", "--limit", "3", "--strict") == 1
    assert "cannot be encoded: bread (--strict" in capsys.readouterr().err


def test_a_server_refusal_is_the_rows_own_only_when_it_is_about_its_text():
    from server.client import RewardServerError
    from server.eval_backend import ServerBackend

    class Client:
        base_url = "http://x"

        def __init__(self, error):
            self.error = error

        def rewards(self, *args, **kwargs):
            raise self.error

    backend = ServerBackend.__new__(ServerBackend)
    backend.mode = ScoreMode(False, "avg")
    group = [Group("p", ("a", "b"))]
    for status, message, refused in [(413, "item 1: the response alone exceeds max_length=8 tokens", True),
                                     (422, "item 0: the conversation is empty", True),
                                     (422, "truncate_response: Extra inputs are not permitted", False),
                                     (413, "9 sequences; the limit is 4", False)]:  # fmt: skip
        (result,) = backend._shard(Client(RewardServerError(status, "x", status, message)), group)
        assert isinstance(result, Refused) == refused and result == message


def test_adjacent_rows_with_one_prompt_go_to_a_server_apart():
    from server.eval_backend import _apart

    a, b, c = Group("p", ("x", "y")), Group("p", ("z", "w")), Group("q", ("x", "y"))
    assert _apart([a, b, c, a]) == [[a], [b, c, a]]  # b would share a's cut in one request


@pytest.mark.parametrize(("servers", "hint"), [(None, "(see --max-length)"), (["http://a"], "(the server's own)")])
def test_the_truncation_line_points_to_the_max_length_that_applied(capsys, servers, hint):
    from dpo.eval_reports import print_table

    results = {"truncated_rows": 3, "model": {"max_length": 512, "servers": servers},
               "config": {"rewardbench_compat": False}, "data": {"scored": 4, "rows": 4, "failed": 0, "skipped": 0},
               "timings": {"score_seconds": 1.0, "rows_per_second": 4.0}}  # fmt: skip
    print_table(results)
    assert f"3 row(s) cut to max_length=512 {hint}" in capsys.readouterr().out
