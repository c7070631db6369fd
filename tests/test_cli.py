import json
import subprocess
import sys

import pytest

from dpo.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpo.cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "model" in out.stdout and "logprobs" in out.stdout
    for sub in (["model", "--help"], ["model", "pull", "--help"], ["logprobs", "--help"]):
        assert run_cli(*sub).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["logprobs", "--data", "/nonexistent.jsonl"], "no such file"),
        (["logprobs", "--data", "{data}", "--model", "/nonexistent/model"], "no such model directory"),
        (["logprobs", "--data", "{data}", "--limit", "0"], "--limit must be at least 1"),
        (["logprobs", "--data", "{data}", "--dtype", "fp8"], "choose one of fp32, bf16, bf16-mixed, fp16"),  # no paired
        (["logprobs", "--data", "{data}", "--dtype", "bf16-paired"], "bf16-paired scores a policy with its reference"),
        (["logprobs", "--data", "{data}", "--bogus"], "unrecognized arguments: --bogus (see 'dporm logprobs --help')"),
        (["eval", "pairs", "--data", "{data}", "--output", "o", "--x"], "(see 'dporm eval pairs --help')"),
    ],
)
def test_user_mistakes_give_one_line_and_no_traceback(tmp_path, capsys, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    args = [a.replace("{data}", str(data)) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dporm: error:") and message in err[0]


def test_file_without_usable_records(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["logprobs", "--data", str(bad)]) == 1
    assert "no record has" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x"\n')
    assert main(["logprobs", "--data", str(broken)]) == 1
    assert "broken.jsonl:1: invalid JSON" in capsys.readouterr().err


@pytest.mark.integration
def test_logprobs_on_pairs_with_the_default_model(tmp_path, default_model_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": "What is the capital of France?",
            "chosen": "The capital of France is Paris.",
            "rejected": "The capital of France is Berlin.",
        },
        {"prompt": "hi", "response": "no pair"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_file = tmp_path / "out.jsonl"
    out = run_cli("logprobs", "--data", str(data), "--output", str(out_file), "--model", str(default_model_dir))
    assert out.returncode == 0, out.stderr
    assert "skipped 1 record" in out.stderr
    result = json.loads(out_file.read_text())
    assert result["logp_chosen"] > result["logp_rejected"]
    assert result["tokens_chosen"] == result["tokens_rejected"]
    assert "1/1 pairs" in out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["score", "--help"],
        ["serve", "--help"],
        ["eval", "rewardbench", "--help"],
        ["train", "--help"],
        ["extract", "--help"],
    ],
)
def test_help_imports_no_model_code(argv):
    """Only the named command's options are built: help and usage errors come back at once, without torch."""
    code = (f"import sys\nfrom dpo.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "usage: dporm" in done.stdout and done.stderr.strip().splitlines()[-1] == "False", done.stderr
