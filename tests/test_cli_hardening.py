"""Bad paths, damaged files and conflicting flags in eval, train, logprobs and model pull: one line, before work."""

import gzip
import json
from pathlib import Path

import pytest

from dpo.cli import main
from dpo.data import read_records
from dpo.errors import DpormError, require_writable
from dpo.eval_runner import _read_done, run_rows
from dpo.train_config import read_config_file

RB = Path(__file__).parent / "data" / "rewardbench-mini.jsonl"
PREFS = Path(__file__).parent / "data" / "prefs.jsonl"


def test_require_writable_knows_files_from_directories(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DpormError, match="not a directory"):
        require_writable(a_file, directory=True)
    with pytest.raises(DpormError, match="is a directory"):
        require_writable(tmp_path)
    with pytest.raises(DpormError, match="no such directory"):
        require_writable(a_file / "below" / "out", parents=True)
    require_writable(tmp_path / "new" / "deeper", parents=True, directory=True)  # would be created: fine


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--server", "http://127.0.0.1:9", "--dtype", "bf16"], "--dtype: offline only"),
        (["--server", "http://127.0.0.1:9", "--max-retries", "-1"], "--max-retries must be at least 0"),
        (["--server", "http://127.0.0.1:9", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_eval_refuses_bad_server_flags(tmp_path, capsys, extra, reason):
    assert main(["eval", "rewardbench", "--data", str(RB), "--output", str(tmp_path / "out"), *extra]) == 1
    assert reason in capsys.readouterr().err


def test_eval_and_train_refuse_a_file_as_output_before_loading(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    evaluate = ["eval", "rewardbench", "--server", "http://127.0.0.1:9", "--data", str(RB), "--output", str(taken)]
    assert main(evaluate) == 1
    assert "not a directory" in capsys.readouterr().err
    train = ["train", "--model", str(tmp_path / "unused"), "--data", str(PREFS), "--output", str(taken)]
    assert main(train) == 1
    assert "not a directory" in capsys.readouterr().err


def test_model_pull_refuses_an_unusable_cache_dir(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["model", "pull", "--cache-dir", str(taken)]) == 1
    assert "--cache-dir" in capsys.readouterr().err


def test_eval_resume_retries_failed_rows_and_refuses_damaged_files(tmp_path):
    scores = tmp_path / "scores.jsonl"
    good = {"row": 0, "scores": [1.0, 0.0]}
    scores.write_text(json.dumps(good) + "\n" + json.dumps({"row": 1, "error": "413 refused"}) + "\n")
    assert list(_read_done(scores)) == [0]  # row 1 is scored again
    assert "error" not in scores.read_text()
    scores.write_text(json.dumps(good) + "\n[1]\n" + json.dumps(good) + "\n")
    with pytest.raises(DpormError, match="not a score record"):
        _read_done(scores)
    (tmp_path / "eval-config.json").write_text("{torn")
    with pytest.raises(DpormError, match="corrupt; rerun with --overwrite"):
        run_rows(None, [], tmp_path, {"command": "x"})


def test_unreadable_data_and_config_files_are_one_line_errors(tmp_path):
    corrupt = tmp_path / "rows.jsonl.gz"
    corrupt.write_bytes(b"garbage, not gzip")
    with pytest.raises(DpormError, match="cannot read"):
        list(read_records(corrupt))
    utf16 = tmp_path / "rows.jsonl"
    utf16.write_bytes(gzip.compress(b'{"prompt": "p"}\n'))
    with pytest.raises(DpormError, match="cannot read"):
        list(read_records(utf16))
    config = tmp_path / "c.yaml"
    config.write_text(": : bad yaml\n  - x\n")
    with pytest.raises(DpormError, match="cannot parse"):
        read_config_file(str(config))


def test_logprobs_skips_records_it_cannot_encode_and_names_them(artifact, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Hi.", "response": "word " * 40}, {"prompt": ["x"], "response": "a"},
            {"prompt": "Hi.", "response": "Hello."}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "logps.jsonl"
    args = ["logprobs", "--model", str(artifact / "policy"), "--data", str(data), "--max-length", "24"]
    assert main([*args, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 record(s) that cannot be encoded: index 0 (" in err and "; index 1 (" in err  # as output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["index"] == 2
    # The values are the definition's: the float64 log-softmax of one unpadded forward, over the response tokens.
    from transformers import AutoModelForCausalLM

    from dpo.encoding import encode
    from dpo.models import load_tokenizer

    try:
        from tests.test_logprobs import reference_logps
    except ModuleNotFoundError:  # a site-packages "tests" package shadows this directory
        from test_logprobs import reference_logps
    seq = encode(load_tokenizer(str(artifact / "policy")), "Hi.", "Hello.", 24)
    want = reference_logps(AutoModelForCausalLM.from_pretrained(artifact / "policy").eval(), seq)
    assert row["truncated"] is seq.truncated is True  # the system prompt does not fit in 24 tokens: cut from the left
    assert row["tokens"] == len(seq.response_ids) == len(want) > 1
    assert row["logp"] == pytest.approx(float(want.sum()), abs=1e-4)
    assert row["mean"] == pytest.approx(float(want.sum()) / len(want), abs=1e-5)


@pytest.mark.parametrize(("argv", "message"), [([], "required: COMMAND"), (["train", "--loss", "bogus"], "--loss")])
def test_usage_mistakes_are_one_line_and_exit_1(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dporm: error:") and message in err[0]


def test_eval_checks_precision_and_device_names_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    argv = ["eval", "rewardbench", "--policy", missing, "--beta", "0.1", "--data", str(RB), "--output", str(tmp_path)]
    assert main([*argv, "--dtype", "bogus"]) == 1
    assert "unknown dtype 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("beta", ["nan", "inf", "-inf", "0"])
@pytest.mark.parametrize("command", ["score", "extract", "train", "eval"])
def test_a_non_finite_or_non_positive_beta_is_one_line(tmp_path, capsys, command, beta):
    argv = {
        "score": ["score", "--policy", "org/unused", "--data", str(PREFS)],
        "extract": ["extract", "--policy", "org/unused", "--reference", "org/unused", "--output", str(tmp_path / "o")],
        "train": ["train", "--model", str(tmp_path / "unused"), "--data", str(PREFS), "--output", str(tmp_path / "o")],
        "eval": ["eval", "rewardbench", "--policy", "org/unused", "--data", str(RB), "--output", str(tmp_path / "o")],
    }[command]
    assert main([*argv, f"--beta={beta}"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dporm:")]
    assert "Traceback" not in err and len(lines) == 1 and "--beta" in lines[0] and "positive" in lines[0], err


def test_score_refuses_to_write_over_its_data(artifact, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    before = data.read_text()
    assert main(["score", str(artifact), "--data", str(data), "--output", str(tmp_path / "." / "rows.jsonl")]) == 1
    assert "is the --data file" in capsys.readouterr().err and data.read_text() == before


def test_score_split_on_a_file_is_an_error_not_ignored(artifact, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    assert main(["score", str(artifact), "--data", str(data), "--split", "test"]) == 1
    assert "--split applies to dataset directories and hub ids" in capsys.readouterr().err
