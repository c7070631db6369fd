"""dporm eval on tiny random Llamas: offline equals two sharded servers, resume on a real run, and
--rewardbench-compat equals RewardBench's own DPOInference (rewardbench 0.1.4, loaded by file path)."""

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from dpo.cli import main
from dpo.encoding import Encoded
from dpo.eval_backend import Group, OfflineBackend, ScoreMode
from dpo.eval_compat import compat_encode
from dpo.scorer import load_reward_model
from server.app import Limits, State, create_app

try:
    from tests.conftest import free_port, save_tiny_artifact
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import free_port, save_tiny_artifact

DATA = Path(__file__).parent / "data"
RB, RB2 = DATA / "rewardbench-mini.jsonl", DATA / "rewardbench2-mini.jsonl"
RESULT_KEYS = ("subsets", "sections", "prior_sets", "overall", "accuracy", "ties")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("eval-artifact"), smollm_tokenizer, 256, 4096)


@pytest.fixture(scope="module")
def reward_model(artifact):
    return load_reward_model(str(artifact), device="cpu")


@pytest.fixture(scope="module")
def servers(reward_model):
    """Two in-process HTTP servers over the same model (the rows get sharded between them)."""
    running = []
    for _ in range(2):
        state = State(Limits(max_items=4), None)  # fewer items than a chunk has: the client must split
        state.attach(reward_model)
        running.append(start_server(state))
    yield [url for _, _, url in running]
    stop_servers(running)


def start_server(state: State, loader=None) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    app = create_app(state, loader)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_servers(running) -> None:
    for server, thread, _ in running:
        server.should_exit = True
        thread.join(timeout=10)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def flat(res: dict) -> dict:
    """The headline numbers as one flat mapping (pytest.approx does not nest)."""
    out = {"overall": res["overall"], "prior": res["prior_sets"], "accuracy": res["accuracy"]["accuracy"]}
    out.update({f"section {k}": v for k, v in res["sections"].items()})
    for name, s in res["subsets"].items():
        out.update({f"{name} accuracy": s["accuracy"], f"{name} margin": s["mean_margin"]})
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", [[], ["--reference-free"], ["--reference-free", "--ref-free-norm", "norm"]])
def test_offline_equals_sharded_servers(tmp_path, artifact, servers, mode):
    base = ["eval", "rewardbench", "--data", str(RB), "--batch-size", "3", *mode]
    assert main([*base, str(artifact), "--device", "cpu", "--output", str(tmp_path / "offline")]) == 0
    urls = [a for url in servers for a in ("--server", url)]
    assert main([*base, *urls, "--output", str(tmp_path / "server")]) == 0
    offline, served = results(tmp_path / "offline"), results(tmp_path / "server")
    assert flat(offline) == pytest.approx(flat(served), abs=1e-5)
    for a, b in zip(rows(tmp_path / "offline"), rows(tmp_path / "server"), strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4) and a["tokens"] == b["tokens"]
    assert offline["config_hash"] == served["config_hash"]  # same model, data and mode: one configuration
    assert served["model"]["servers"] == servers


def test_rewardbench2_offline_equals_server(tmp_path, artifact, servers):
    base = ["eval", "rewardbench2", "--data", str(RB2), "--batch-size", "2"]
    assert main([*base, str(artifact), "--device", "cpu", "--output", str(tmp_path / "a")]) == 0
    assert main([*base, "--server", servers[0], "--server", servers[1], "--output", str(tmp_path / "b")]) == 0
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert a["overall"] == pytest.approx(b["overall"], abs=1e-6)
    assert set(a["subsets"]) == {"Factuality", "Math", "Focus", "Ties"}


def test_server_still_loading_is_awaited_and_a_failed_load_is_one_line(tmp_path, artifact, reward_model, capsys):
    """A server started just before ``dporm eval`` answers /info while loading: eval waits for the model."""

    def slow():
        time.sleep(1.5)
        return reward_model

    def broken():
        raise RuntimeError("no weights here")

    running = [start_server(State(Limits(), None), slow), start_server(State(Limits(), None), broken)]
    try:
        base = ["eval", "rewardbench", "--data", str(RB), "--limit", "4"]
        assert main([*base, "--server", running[0][2], "--output", str(tmp_path / "served")]) == 0
        assert "waiting for" in capsys.readouterr().err
        assert main([*base, str(artifact), "--device", "cpu", "--output", str(tmp_path / "offline")]) == 0
        served, offline = results(tmp_path / "served"), results(tmp_path / "offline")
        assert served["model"]["beta"] == offline["model"]["beta"] == reward_model.beta
        assert served["model"]["policy_sha256"] == offline["model"]["policy_sha256"] is not None
        assert served["config_hash"] == offline["config_hash"]  # so either run can extend the other
        assert main([*base, "--server", running[1][2], "--output", str(tmp_path / "broken")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        cause = "the server could not load its model: RuntimeError: no weights here"
        assert err[-1] == f"dporm: error: {running[1][2]}: {cause}"
    finally:
        stop_servers(running)


def test_resume_of_a_real_run_is_identical(tmp_path, artifact):
    args = ["eval", "rewardbench", str(artifact), "--data", str(RB), "--device", "cpu", "--batch-size", "4"]
    assert main([*args, "--output", str(tmp_path / "full")]) == 0
    assert main([*args, "--output", str(tmp_path / "cut"), "--limit", "12"]) == 0  # same rows: same configuration
    scores = tmp_path / "cut" / "scores.jsonl"
    kept = scores.read_text().splitlines()[:5]
    scores.write_text("\n".join(kept) + "\n" + kept[5 - 1][:20])  # interrupted mid-write
    assert main([*args, "--output", str(tmp_path / "cut"), "--limit", "12"]) == 0
    full, cut = results(tmp_path / "full"), results(tmp_path / "cut")
    assert cut["timings"]["rows_scored_now"] == 7
    for key in RESULT_KEYS:
        assert full[key] == cut[key]
    assert [r["scores"] for r in rows(tmp_path / "full")] == [r["scores"] for r in rows(tmp_path / "cut")]


def _dpo_inference_module():
    """rewardbench/dpo.py by file path: ``import rewardbench`` fails on transformers 5."""
    spec = importlib.util.find_spec("rewardbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rewardbench is not installed (pip install --no-deps rewardbench==0.1.4)")
    path = Path(next(iter(spec.submodule_search_locations))) / "dpo.py"
    module_spec = importlib.util.spec_from_file_location("rewardbench_dpo", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _rewardbench_row(tok, prompt, chosen, rejected) -> dict:
    """What rewardbench's prepare_dialogue_from_tokenizer hands to tokenize_row (single turn)."""
    user = [{"role": "user", "content": prompt}]
    render = lambda m: tok.apply_chat_template(m, tokenize=False)  # noqa: E731
    return {"prompt": render(user), "text_chosen": render([*user, {"role": "assistant", "content": chosen}]),
            "text_rejected": render([*user, {"role": "assistant", "content": rejected}])}  # fmt: skip


def _batch(row: dict, pad: int) -> dict:
    """DPODataCollatorWithPadding for one row (TRL 1.x dropped it): lists to [1, T] tensors."""
    return {k: torch.tensor([v]) for k, v in row.items() if k.startswith(("chosen_", "rejected_"))}


def test_compat_tokenization_equals_tokenize_row(reward_model, smollm_tokenizer):
    dpo = _dpo_inference_module()
    inference = dpo.DPOInference(reward_model.policy, None, smollm_tokenizer, accelerator=None, ref_free_norm="sum")
    cases = [
        ("Tell me a fact.", "    indented code", "No."),  # leading spaces: the merged-token case
        ("word " * 2100, "A short answer.", "Another, slightly longer, answer."),  # prompt cut to its last 128
        ("Hi.", "many " * 2000, "few"),  # still too long: responses cut to their first 1920
    ]
    for prompt, chosen, rejected in cases:
        ref = inference.tokenize_row(_rewardbench_row(smollm_tokenizer, prompt, chosen, rejected))
        ours = compat_encode(smollm_tokenizer, prompt, [chosen, rejected])
        for seq, side in zip(ours, ("chosen", "rejected"), strict=True):
            labels = ref[f"{side}_labels"]
            assert list(seq.input_ids) == ref[f"{side}_input_ids"]
            assert len(seq.prompt_ids) == sum(label == -100 for label in labels)


@pytest.mark.parametrize("norm", [None, "avg", "sum", "norm"])
def test_compat_scores_equal_dpo_inference(reward_model, smollm_tokenizer, norm):
    dpo = _dpo_inference_module()
    m = reward_model
    ref_model = None if norm else m.reference
    inference = dpo.DPOInference(m.policy, ref_model, smollm_tokenizer, accelerator=type("A", (), {"device": "cpu"}),
                                 ref_free_norm=norm or "norm")  # fmt: skip
    backend = OfflineBackend(m, ScoreMode(norm is not None, norm or "avg"), compat=True)
    data = [json.loads(line) for line in RB.read_text().splitlines()[:8]]
    for row in data:
        batch = _batch(inference.tokenize_row(_rewardbench_row(smollm_tokenizer, *(row[k] for k in
                       ("prompt", "chosen", "rejected")))), smollm_tokenizer.pad_token_id)  # fmt: skip
        with torch.no_grad():
            chosen, rejected = inference.inference_step(batch, ref_free=norm is not None)
        ours = backend.score_groups([Group(row["prompt"], (row["chosen"], row["rejected"]))])[0]
        scale = 1 if norm else m.beta  # RewardBench reports log-ratios without β
        assert ours[0].score / scale == pytest.approx(float(chosen[0]), abs=1e-4)
        assert ours[1].score / scale == pytest.approx(float(rejected[0]), abs=1e-4)
    assert isinstance(backend.encode(Group("x", ("a", "b")))[0], Encoded)


def test_compat_cli_runs(tmp_path, artifact):
    out = tmp_path / "compat"
    assert main(["eval", "rewardbench", str(artifact), "--data", str(RB), "--device", "cpu", "--rewardbench-compat",
                 "--output", str(out)]) == 0  # fmt: skip
    res = results(out)
    assert res["config"]["rewardbench_compat"] and res["data"]["scored"] == 12


def test_max_length_past_the_models_context_is_one_line(tmp_path, artifact, capsys):
    args = ["eval", "rewardbench", str(artifact), "--data", str(RB), "--device", "cpu", "--output", str(tmp_path)]
    assert main([*args, "--max-length", "4097"]) == 1  # this module's artifact has models of 4096 positions
    assert "past the models' context of 4096 positions" in capsys.readouterr().err


def test_over_long_rows_are_cut_alike_offline_and_on_servers(tmp_path, artifact, servers):
    """Offline eval cuts the prompt from the left, then the response; servers asked by eval cut the same way."""
    data = tmp_path / "long.jsonl"
    row = {"rejected": "No.", "subset": "alpacaeval-easy"}
    rows_in = [{**row, "prompt": "word " * 300, "chosen": "Yes.", "id": 1},
               {**row, "prompt": "Say yes.", "chosen": "yes " * 400, "id": 2}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    base = ["eval", "rewardbench", "--data", str(data), "--batch-size", "2"]
    assert main([*base, str(artifact), "--device", "cpu", "--output", str(tmp_path / "offline")]) == 0
    assert main([*base, "--server", servers[0], "--output", str(tmp_path / "server")]) == 0
    for a, b in zip(rows(tmp_path / "offline"), rows(tmp_path / "server"), strict=True):
        assert a["truncated"] == b["truncated"] and any(a["truncated"]) and a["tokens"] == b["tokens"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
