"""``dporm train`` end to end on a tiny Llama with the real SmolLM2 tokenizer (fast, CPU, fp32)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo.batching import encode_examples
from dpo.cli import main
from dpo.errors import DpormError
from dpo.logprobs import sequence_logprobs
from dpo.manifest import Manifest
from dpo.preference_data import PreferenceData, PreferenceExample, load_preferences
from dpo.train_log import read_metrics
from tests.conftest import free_port, make_tiny_llama

DATA = Path(__file__).parent / "data"
PREFS, RANKINGS = str(DATA / "prefs.jsonl"), str(DATA / "rankings.jsonl")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "grad_norm", "lr", "tokens/s")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    model.save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


def train(tiny_model_dir, output, *extra, data=PREFS):
    args = [
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        str(data),
        "--output",
        str(output),
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--warmup-ratio",
        "0",
        "--max-length",
        "128",
        "--device",
        "cpu",
        *map(str, extra),
    ]
    assert main(args) == 0
    return Manifest.load(output)


def current_umask() -> int:
    """The process umask, from the kernel's view (setting it to read it would race with other threads)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)


def trained_state(output) -> dict[str, torch.Tensor]:
    policy = Path(output) / "policy"
    files = ["adapter_model.safetensors"] if (policy / "adapter_model.safetensors").exists() else ["model.safetensors"]
    return load_file(str(policy / files[0]))


def test_lora_run_writes_artifact_metrics_and_curves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    manifest = train(tiny_model_dir, out, "--max-steps", 3, "--eval-size", 4, "--tensorboard")
    assert manifest.adapter and manifest.reference == str(Path(tiny_model_dir).resolve())
    assert manifest.beta == 0.1 and manifest.loss == "sigmoid" and manifest.normalize == "sum"
    assert manifest.tokenization["max_length"] == 128 and "im_start" in manifest.tokenization["chat_template"]
    assert len(manifest.data_fingerprint) == 64 and manifest.provenance["train_examples"] == 16
    assert (out / "policy" / "adapter_model.safetensors").exists() and (out / "curves.png").stat().st_size > 10_000
    assert list((out / "tensorboard").iterdir())
    records = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(name in r for r in train_rows for name in METRICS)
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference at step 1
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and evals[0]["rewards/margins"] == 0.0
    elapsed = [r["seconds"] for r in records]  # since the run started, on every line
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all(0 < r["eval_seconds"] < r["seconds"] for r in evals)  # from the run's start: loading counts too
    assert manifest.metrics["eval"]["rewards/accuracies_ci95_low"] <= manifest.metrics["eval"]["rewards/accuracies"]


def test_logged_reward_is_the_reward_recomputed_from_the_artifact(tiny_model_dir, tmp_path, smollm_tokenizer):
    """The guarantee: the artifact's policy and reference reproduce the rewards the trainer logged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    manifest = train(tiny_model_dir, out, "--max-steps", 2, "--eval-size", 4)
    reference = AutoModelForCausalLM.from_pretrained(manifest.reference)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest.reference), out / "policy")
    examples = load_preferences(PREFS).examples[-4:]
    encoded = encode_examples(smollm_tokenizer, examples, manifest.tokenization["max_length"])
    seqs = [c for ex in encoded for c in ex.completions]
    with torch.no_grad():
        rewards = manifest.beta * (sequence_logprobs(policy, seqs).logp - sequence_logprobs(reference, seqs).logp)
    with torch.no_grad():
        ref = sequence_logprobs(reference, seqs).logp
    before = manifest.metrics["eval_initial"]  # computed from the reference alone
    assert before["logps/accuracies"] == pytest.approx(float((ref[0::2] > ref[1::2]).float().mean()))
    assert before["logps/chosen"] == pytest.approx(float(ref[0::2].mean()), abs=1e-4)
    logged = manifest.metrics["eval"]
    assert float(rewards[0::2].mean()) == pytest.approx(logged["rewards/chosen"], abs=1e-6)
    assert float(rewards[1::2].mean()) == pytest.approx(logged["rewards/rejected"], abs=1e-6)
    assert logged["rewards/chosen"] != 0.0


def test_full_finetune_frozen_copy_equals_precomputed_reference_and_cache_is_reused(tiny_model_dir, tmp_path):
    cache = tmp_path / "ref-cache"
    common = ("--finetune", "full", "--max-steps", 2, "--lr", "1e-3", "--eval-size", 4)
    frozen = train(tiny_model_dir, tmp_path / "frozen", *common)
    first = train(tiny_model_dir, tmp_path / "pre1", *common, "--precompute-ref", "--ref-cache-dir", cache)
    second = train(tiny_model_dir, tmp_path / "pre2", *common, "--precompute-ref", "--ref-cache-dir", cache)
    assert not frozen.adapter and (tmp_path / "frozen" / "policy" / "model.safetensors").exists()
    assert first.provenance["reference_cache_hit"] is False and second.provenance["reference_cache_hit"] is True
    assert len(list(cache.iterdir())) == 1
    for run in (first, second):
        assert run.metrics["eval"]["loss"] == pytest.approx(frozen.metrics["eval"]["loss"], abs=1e-6)
    a, b = trained_state(tmp_path / "frozen"), trained_state(tmp_path / "pre2")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Another tokenization setting, eval set, autocast or reference config (same weights) is another cache entry.
    train(tiny_model_dir, tmp_path / "pre3", *common, "--precompute-ref", "--ref-cache-dir", cache, "--max-length", 100)
    assert len(list(cache.iterdir())) == 2
    fewer = train(tiny_model_dir, tmp_path / "pre4", *common, "--precompute-ref", "--ref-cache-dir", cache,
                  "--limit", 8)  # fmt: skip  # other rows (another --eval-size alone splits the same rows otherwise)
    assert not fewer.provenance["reference_cache_hit"]
    amp = train(tiny_model_dir, tmp_path / "pre5", *common, "--precompute-ref", "--ref-cache-dir", cache,
                "--mixed-precision", "bf16")  # fmt: skip
    assert not amp.provenance["reference_cache_hit"]
    rope = tmp_path / "rope"
    shutil.copytree(tiny_model_dir, rope)
    config = json.loads((rope / "config.json").read_text())
    rope_parameters = {**config["rope_parameters"], "rope_theta": 100.0}  # same weights, other positions
    (rope / "config.json").write_text(json.dumps({**config, "rope_parameters": rope_parameters}))
    moved = train(str(rope), tmp_path / "pre6", *common, "--precompute-ref", "--ref-cache-dir", cache)
    assert not moved.provenance["reference_cache_hit"] and len(list(cache.iterdir())) == 5


def test_lora_adapter_off_reference_equals_precomputed(tiny_model_dir, tmp_path):
    common = ("--max-steps", 2, "--eval-size", 4)
    live = train(tiny_model_dir, tmp_path / "live", *common)
    pre = train(tiny_model_dir, tmp_path / "pre", *common, "--precompute-ref", "--ref-cache-dir", tmp_path / "c")
    assert pre.metrics["eval"]["loss"] == pytest.approx(live.metrics["eval"]["loss"], abs=1e-6)


def test_reference_free_run_saves_a_merged_policy(tiny_model_dir, tmp_path):
    manifest = train(tiny_model_dir, tmp_path / "run", "--max-steps", 1, "--reference-free")
    assert manifest.reference is None and not manifest.adapter
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()
    # Every saved file gets the umask's mode (save_pretrained's temporary-file weights came out 0600).
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "run" / "policy").iterdir()}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-6)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path):
    big = train(tiny_model_dir, tmp_path / "big", "--max-steps", 2, "--batch-size", 8)
    acc = train(tiny_model_dir, tmp_path / "acc", "--max-steps", 2, "--batch-size", 4, "--grad-accum", 2)
    assert acc.metrics["train"]["loss"] == pytest.approx(big.metrics["train"]["loss"], abs=1e-6)
    a, b = trained_state(tmp_path / "big"), trained_state(tmp_path / "acc")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_autocast_trains_fp32_master_weights(tiny_model_dir, tmp_path):
    train(tiny_model_dir, tmp_path / "fp32", "--max-steps", 2, "--no-shuffle")
    train(tiny_model_dir, tmp_path / "bf16", "--max-steps", 2, "--no-shuffle", "--mixed-precision", "bf16")
    fp32, bf16 = (read_metrics(tmp_path / run / "metrics.jsonl")[0] for run in ("fp32", "bf16"))
    assert bf16["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy == reference at init
    assert bf16["logps/chosen"] != fp32["logps/chosen"]  # the forward really ran in bf16 ...
    assert bf16["logps/chosen"] == pytest.approx(fp32["logps/chosen"], rel=2e-2)  # ... with fp32 log-softmax
    state = trained_state(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # the adapter was updated


def test_plackett_luce_on_rankings(tiny_model_dir, tmp_path, capsys):
    tied = {"prompt": "Describe rain briefly.", "responses": ["Rain is wet.", "Rain falls.", "No."],
            "scores": [2.0, 2.0, 1.0]}  # fmt: skip
    data = tmp_path / "rankings.jsonl"
    data.write_text(json.dumps(tied) + "\n" + Path(RANKINGS).read_text())
    manifest = train(tiny_model_dir, tmp_path / "run", "--max-steps", 2, "--loss", "plackett_luce",
                     "--batch-size", 2, data=data)  # fmt: skip
    err = capsys.readouterr().err
    assert "skipped 1 ranking(s) with tied scores" in err and "8 training and 0 eval examples" in err
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["pairs"] == 6  # 2 rankings of 3 responses: 3 pairs each, 3 sequences each
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=1e-5)  # log 3! at init
    assert manifest.loss == "plackett_luce"


PAIRWISE_LOSSES = ("sigmoid", "sigmoid_norm", "robust", "hinge", "ipo", "ipo_sum")


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("loss", PAIRWISE_LOSSES)
def test_each_loss_after_a_step_is_its_formula_on_the_logged_rewards(tiny_model_dir, smollm_tokenizer, tmp_path,
                                                                     loss):  # fmt: skip
    """Step 2, one pair, the policy moved: the logged loss is the loss's formula on the logged rewards, with the
    smoothing ε given and the response token counts of the pair: what the trainer passes to the loss."""
    eps, beta = (0.2 if loss in ("sigmoid", "robust") else 0.0), 0.1
    row = tmp_path / "one.jsonl"
    row.write_text(Path(PREFS).read_text().splitlines()[1] + "\n")
    train(tiny_model_dir, tmp_path / "run", "--max-steps", 2, "--loss", loss, "--label-smoothing", eps,
          "--batch-size", 1, "--eval-size", 0, "--lr", 2e-2, data=row)  # fmt: skip
    step2 = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"][1]
    (ex,) = encode_examples(smollm_tokenizer, load_preferences(str(row)).examples, 128)
    n_w, n_l = (len(c.response_ids) for c in ex.completions)
    r_w, r_l = step2["rewards/chosen"], step2["rewards/rejected"]
    m = r_w - r_l  # β Δ
    assert abs(m) > 0.05, "the step must move the margin, or every formula reads its value at 0"
    per_token = (r_w / n_w - r_l / n_l) / beta  # ρ_w/|y_w| − ρ_l/|y_l|
    expected = {
        "sigmoid": -(1 - eps) * _logsigmoid(m) - eps * _logsigmoid(-m),
        "robust": (-(1 - eps) * _logsigmoid(m) + eps * _logsigmoid(-m)) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - m),
        "ipo_sum": (m / beta - 1 / (2 * beta)) ** 2,
        "ipo": (per_token - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": -_logsigmoid(beta * per_token),
    }[loss]
    assert step2["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


# --lr 1e-3 --warmup-ratio 0.25 --max-steps 4: transformers' get_scheduler with ceil(0.25·4) = 1 warmup step of
# 4, and a logged train row holds the lr its step used (get_last_lr before scheduler.step): 1e-3·f(s) at step
# index s = 0..3 (logged as steps 1..4). Warmup, s < 1: f(s) = s/1, so f(0) = 0 whatever the schedule. Then
#   linear:   f(s) = (4 − s)/(4 − 1)             → 3/3, 2/3, 1/3
#   cosine:   f(s) = ½(1 + cos(π·(s − 1)/(4 − 1))) → ½(1 + cos 0) = 1, ½(1 + cos π/3) = ¾, ½(1 + cos 2π/3) = ¼
#   constant: f(s) = 1 (constant_with_warmup)
LR_BY_SCHEDULE = {
    "linear": [0.0, 1e-3, 2e-3 / 3, 1e-3 / 3],
    "cosine": [0.0, 1e-3, 7.5e-4, 2.5e-4],
    "constant": [0.0, 1e-3, 1e-3, 1e-3],
}


@pytest.mark.parametrize("schedule", list(LR_BY_SCHEDULE))
def test_learning_rate_follows_warmup_then_the_schedule(tiny_model_dir, tmp_path, schedule):
    train(tiny_model_dir, tmp_path / "run", "--lr", "1e-3", "--warmup-ratio", "0.25", "--max-steps", 4,
          "--schedule", schedule, "--eval-size", 0)  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx(LR_BY_SCHEDULE[schedule], rel=1e-9, abs=1e-15)


def optimizer_steps(record):
    """Calls ``record(optimizer)`` before every torch optimizer step of the block (AdamW under accelerate's wrapper)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    return register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: record(optimizer))


def global_grad_norm(optimizer) -> float:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.mark.parametrize("max_norm", [1e-4, 0.0])
def test_gradients_are_clipped_to_max_grad_norm_and_0_turns_clipping_off(tiny_model_dir, tmp_path, max_norm):
    """The optimizer steps on gradients of norm ≤ --max-grad-norm; the logged grad_norm is the norm before clipping."""
    seen = []
    handle = optimizer_steps(lambda optimizer: seen.append(global_grad_norm(optimizer)))
    try:
        train(tiny_model_dir, tmp_path / "run", "--max-steps", 2, "--max-grad-norm", max_norm)
    finally:
        handle.remove()
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(seen) == len(logged) == 2
    if max_norm:
        assert all(before > 100 * max_norm for before in logged)  # clipping had work to do ...
        # ... and scaled by max/(norm + 1e-6) (torch's clip_grad_norm_): max, to within 1e-6/norm.
        assert all(max_norm * (1 - 1e-3) <= after <= max_norm * (1 + 1e-5) for after in seen), seen
    else:
        assert seen == pytest.approx(logged, rel=1e-5) and min(seen) > 0  # off: the gradients as computed


def test_weight_decay_applies_to_matrices_and_not_to_1d_parameters(tiny_model_dir, tmp_path):
    groups = []
    handle = optimizer_steps(lambda optimizer: groups.append(
        [(g["weight_decay"], sorted({p.ndim for p in g["params"]}), len(g["params"])) for g in optimizer.param_groups]
    ))  # fmt: skip
    try:
        train(tiny_model_dir, tmp_path / "run", "--finetune", "full", "--max-steps", 1, "--weight-decay", 0.125)
    finally:
        handle.remove()
    # The tiny Llama (2 layers, untied head): embeddings, 7 projections a layer and the head are matrices (16);
    # 2 RMSNorm weights a layer and the final norm are vectors (5).
    assert groups == [[(0.125, [2], 16), (0.0, [1], 5)]]


def test_config_file_values_are_overridden_by_flags(tiny_model_dir, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(f'model = "{tiny_model_dir}"\ndata = "{PREFS}"\nbeta = 0.5\nmax-steps = 1\nlr = 1e-3\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out), "--beta", "0.25", "--device", "cpu",
                 "--max-length", "128"]) == 0  # fmt: skip
    manifest = Manifest.load(out)
    assert manifest.beta == 0.25 and manifest.provenance["config"]["lr"] == 1e-3


def _run_cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "dpo.cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def _base_args(model, output):
    output = str(output)
    return ["train", "--model", model, "--data", PREFS, "--output", output, "--batch-size", "2", "--lr", "5e-3",
            "--max-length", "128", "--device", "cpu", "--epochs", "3", "--save-every", "2", "--keep-checkpoints", "2",
            "--lora-dropout", "0.1"]  # fmt: skip


def test_a_resumed_log_counts_seconds_on_from_its_last_kept_line(tmp_path, monkeypatch):
    from dpo import train_log

    clock = iter([107.5, 200.0, 203.0])  # monotonic readings: a write; reopen, a write
    monkeypatch.setattr(train_log.time, "monotonic", lambda: next(clock))
    path = tmp_path / "metrics.jsonl"
    train_log.MetricsLog(path, started=100.0).write(1, {"loss": 0.5})  # the run started at 100
    with path.open("a") as f:  # written after the last checkpoint by the interrupted run: dropped on resume
        f.write('{"step": 2, "split": "train", "loss": 0.4, "seconds": 50.0}\n')
    train_log.MetricsLog(path, resume_step=1).write(2, {"loss": 0.3})
    assert [(r["step"], r["seconds"]) for r in read_metrics(path)] == [(1, 7.5), (2, 10.5)]
    old = '{"step": 0, "split": "eval", "loss": 0.69, "seconds": 4.0}\n{"step": 1, "split": "train", "loss": 0.5}\n'
    path.write_text(old)  # an older log: "seconds" only on evals, as their duration
    clock = iter([10.0, 12.0])
    train_log.MetricsLog(path, resume_step=1).write(2, {"loss": 0.3})
    assert read_metrics(path)[-1]["seconds"] == 2.0  # counted from this process: no offset from an eval's duration


def test_the_fp16_gradient_scaler_is_checkpointed(tmp_path):
    from dpo.checkpoints import load_checkpoint, save_checkpoint

    weight = torch.ones(2)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale is set up on first use
    scaler.update(512.0)  # as after overflow backoffs: the scale a resume must continue from
    path = save_checkpoint(tmp_path, 3, {"w": weight}, optimizer, scheduler, {}, keep=1, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=65536.0)
    assert load_checkpoint(path, {"w": weight}, optimizer, scheduler, 0, fresh)["step"] == 3
    assert fresh.get_scale() == 512.0
    load_checkpoint(path, {"w": weight}, optimizer, scheduler, 0)  # no scaler (bf16, fp32): none restored


def test_killed_run_resumes_exactly(tiny_model_dir, tmp_path):
    """SIGKILL after the first checkpoint, then --resume: same weights and loss as an uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_base_args(tiny_model_dir, full)) == 0
    proc = _run_cli(_base_args(tiny_model_dir, cut))
    deadline = time.time() + 120
    while not list((cut / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "dporm.json").exists()
    # The same run, its paths spelled otherwise: the model and the output directory through "/./".
    assert main([*_base_args(f"{tiny_model_dir}/.", f"{tmp_path}/./cut"), "--resume"]) == 0
    a, b = trained_state(full), trained_state(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_log, cut_log = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in cut_log] == [r["step"] for r in full_log]  # lines after the checkpoint replaced
    assert cut_log[-1]["loss"] == full_log[-1]["loss"]
    assert len(list((cut / "checkpoints").glob("step-*"))) == 2
    assert main([*_base_args(tiny_model_dir, cut), "--resume"]) == 1  # finished: nothing to resume, log untouched
    assert read_metrics(cut / "metrics.jsonl") == cut_log


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    common = ["--model", tiny_model_dir, "--data", PREFS, "--lr", "5e-3", "--max-length", "128", "--device", "cpu",
              "--max-steps", "3", "--warmup-ratio", "0"]  # fmt: skip
    assert main(["train", *common, "--output", str(single), "--batch-size", "4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
              "-m", "dpo.cli", "train", *common, "--output", str(double), "--batch-size", "2"]  # fmt: skip
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = trained_state(single), trained_state(double)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    m1, m2 = Manifest.load(single), Manifest.load(double)
    assert m2.provenance["processes"] == 2
    assert m2.metrics["train"]["loss"] == pytest.approx(m1.metrics["train"]["loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reference-free", "--precompute-ref"], "--reference-free conflicts with --precompute-ref"),
        (["--finetune", "full", "--lora-r", "8"], "--lora-r conflicts with --finetune"),
        (["--loss", "hinge", "--label-smoothing", "0.1"], "--label-smoothing conflicts with --loss"),
        (["--max-steps", "2", "--epochs", "2"], "--max-steps conflicts with --epochs"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive finite number, got -1"),
        (["--beta", "0"], "--beta must be a positive finite number, got 0"),
        (["--max-length", "1000"], "--max-length 1000 exceeds the context of"),  # the tiny model has 512 positions
        (["--mixed-precision", "fp16"], "--mixed-precision fp16 does nothing on a CPU"),
    ],
)
def test_conflicting_options_name_the_conflict(tiny_model_dir, tmp_path, capsys, flags, message):
    assert main(["train", "--model", tiny_model_dir, "--data", PREFS, "--output", str(tmp_path / "o"), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_user_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n')
    cases = [
        (["--data", str(bad)], "no usable preference rows"),
        (["--data", PREFS, "--config", str(tmp_path / "missing.yaml")], "no such config file"),
        (["--data", PREFS, "--resume"], "no checkpoint"),
    ]
    for flags, message in cases:
        assert main(["train", "--model", tiny_model_dir, "--output", str(tmp_path / "o"), *flags]) == 1
        err = capsys.readouterr().err
        assert message in err
        if "--config" not in flags:  # past the config: the default --max-length meets the model, lowered not refused
            assert "--max-length 512: the model's context (the default 1024 is past it)" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    assert main(["train", "--model", tiny_model_dir, "--data", PREFS, "--output", str(tmp_path / "used")]) == 1
    assert "earlier run" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    from dataclasses import fields

    from dpo.train_config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_a_flag_overrides_the_config_files_alternative_to_it(tmp_path):
    from dpo.train_config import build_config

    config = tmp_path / "train.yaml"
    config.write_text(f"data: {PREFS}\noutput: {tmp_path / 'out'}\nepochs: 1\neval_size: 4\n")
    c, explicit = build_config({"config": str(config), "max_steps": 3, "eval_data": str(PREFS)})
    assert c.max_steps == 3 and c.epochs == 1.0 and "epochs" not in explicit  # the default, no longer a conflict
    assert c.eval_data == str(PREFS) and c.eval_size == 0
    c, _ = build_config({"config": str(config), "eval_size": 2})  # no alternative given: the file stands
    assert c.eval_size == 2 and c.max_steps is None
    with pytest.raises(DpormError, match="--max-steps conflicts with --epochs"):
        build_config({"config": str(config), "max_steps": 3, "epochs": 2})  # both typed: still a conflict


@pytest.mark.parametrize("targets", ["lm_head", "lm_head,embed_tokens"])
def test_a_merged_lora_on_a_tied_head_is_the_model_the_adapter_computed(tmp_path, smollm_tokenizer, targets):
    from transformers import AutoModelForCausalLM

    from dpo.lora import apply_lora
    from dpo.train_command import _save_policy

    model = apply_lora(make_tiny_llama(tie_word_embeddings=True), r=2, targets=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer 0
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    expected = model(ids).logits
    _save_policy(model, smollm_tokenizer, tmp_path / "policy", keep_adapter=False)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    torch.testing.assert_close(saved(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_resume_compares_the_files_the_run_read_not_their_spelling(tmp_path, monkeypatch):
    """A relative --data resolved where the run started: the same spelling from another directory is another file."""
    from dpo.train_command import _check_resumable
    from dpo.train_config import build_config, local_paths

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prefs.jsonl").write_text(f'{{"prompt": "{name}", "chosen": "x", "rejected": "y"}}\n')
    monkeypatch.chdir(tmp_path / "a")
    config, _ = build_config({"data": "prefs.jsonl", "output": "run"})
    checkpoint = tmp_path / "step"
    checkpoint.mkdir()
    state = {"config": config.to_dict(), "paths": local_paths(config)}
    (checkpoint / "state.json").write_text(json.dumps(state))
    assert state["paths"] == {"data": str(tmp_path / "a" / "prefs.jsonl")}
    _check_resumable(checkpoint, config)  # where it started
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(DpormError, match="options differ from the checkpointed run: data"):
        _check_resumable(checkpoint, config)  # "prefs.jsonl" here is b's file
    _check_resumable(checkpoint, build_config({"data": "../a/prefs.jsonl", "output": "run"})[0])
    del state["paths"]  # a checkpoint written before paths were recorded: compared as spelled
    (checkpoint / "state.json").write_text(json.dumps(state))
    _check_resumable(checkpoint, config)


def test_references_are_computed_without_dropout_while_the_policy_trains():
    """With dropout in the model and the policy in train mode, every reference pass is the eval-mode function."""
    from dpo.encoding import Encoded
    from dpo.lora import apply_lora
    from dpo.reference import adapter_off_reference, model_reference
    from dpo.trainer import PolicyScorer

    seqs = [Encoded((1, 5, 7, 9), (11, 13, 17, 2)), Encoded((1, 5), (19, 23, 2))]
    model = make_tiny_llama(attention_dropout=0.5)
    with torch.no_grad():
        expected = sequence_logprobs(model, seqs).logp  # eval mode
    model.train()
    assert not torch.equal(sequence_logprobs(model, seqs).logp, sequence_logprobs(model, seqs).logp)  # noisy
    reference = model_reference(model)
    assert torch.equal(reference(seqs), expected) and torch.equal(reference(seqs), expected)
    assert all(m.training for m in model.modules())  # the training mode is left as it was
    scorer = PolicyScorer(apply_lora(model, 4, 8.0, 0.5, "all-linear", 0))
    scorer.train()
    assert torch.equal(adapter_off_reference(scorer)(seqs), expected) and scorer.model.training


def test_resume_refuses_another_process_count_other_rows_or_rewritten_weights(tiny_model_dir, tmp_path, capsys):
    out, model = tmp_path / "run", tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["train", "--model", str(model), "--data", PREFS, "--output", str(out), "--batch-size", "2",
            "--max-length", "128", "--device", "cpu", "--max-steps", "2", "--save-every", "1"]  # fmt: skip
    assert main(args) == 0
    (out / "dporm.json").unlink()  # as if killed after its last checkpoint
    state_file = sorted((out / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1 and state["data_fingerprint"]
    for key, value, message in [("processes", 2, "trained on 2 process(es), this one has 1"),
                                ("data_fingerprint", "0" * 16, "training rows differ")]:  # fmt: skip
        state_file.write_text(json.dumps({**state, key: value}))
        assert main([*args, "--resume"]) == 1
        assert message in capsys.readouterr().err
    state_file.write_text(json.dumps(state))
    assert main([*args, "--resume", "--lr", "1e-2", "--seed", "7"]) == 1  # they change the weights: refused
    assert "options differ from the checkpointed run: lr, seed" in capsys.readouterr().err
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1e-3}, str(weights), metadata={"format": "pt"})
    assert main([*args, "--resume"]) == 1  # the same path, other bytes: the checkpoint would mean another run
    assert "the model's weights (--model) differ from those the run started from" in capsys.readouterr().err
    weights.write_bytes(original)
    assert main([*args, "--resume"]) == 0  # unchanged: resumes (here at its last step) and finishes


def test_plackett_luce_skips_rankings_with_ties():
    from dpo.train_command import _strict_rankings

    strict = PreferenceExample("p", ("a", "b", "c"), ((0, 1), (0, 2), (1, 2)), 1)
    tied = PreferenceExample("p", ("a", "b", "c"), ((0, 1), (0, 2)), 2)  # b and c tie: no pair between them
    said = []
    kept = _strict_rankings(PreferenceData([strict, tied], [(3, "bad row")]), said.append)
    assert kept.examples == [strict] and kept.skipped == [(3, "bad row")]
    assert said == ["skipped 1 ranking(s) with tied scores: --loss plackett_luce needs a strict order"]


def test_limit_counts_rows_that_encode(tiny_model_dir, tmp_path, capsys):
    rows = Path(PREFS).read_text().splitlines()
    too_long = {"prompt": "Say a lot.", "chosen": "word " * 300, "rejected": "no"}  # > --max-length 128
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join([json.dumps(too_long), *rows]) + "\n")
    out = tmp_path / "run"
    train(tiny_model_dir, out, "--max-steps", 1, "--eval-size", 4, "--limit", 3, "--save-every", 1, data=data)
    err = capsys.readouterr().err
    assert "skipped 1 row(s) that cannot be encoded: 1 (" in err and "3 training and 4 eval examples" in err
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    read = load_preferences(str(data)).examples[:4]  # the rows read to find 3 that encode
    assert state["data_fingerprint"] == PreferenceData(read).fingerprint()
