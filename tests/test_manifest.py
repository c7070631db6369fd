import json
import os

import pytest

from dpo.errors import DpormError
from dpo.manifest import FILENAME, Manifest


def test_round_trip_and_path_resolution(tmp_path):
    (tmp_path / "policy").mkdir()
    m = Manifest(
        policy="policy",
        reference="HuggingFaceTB/SmolLM2-135M-Instruct",
        beta=0.1,
        loss="sigmoid",
        tokenization={"max_length": 512},
        data_fingerprint="abc",
        metrics={"rewards/accuracies": 0.6},
    )
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == m and loaded.provenance["dporm_version"]
    assert loaded.resolve(tmp_path, loaded.policy) == str((tmp_path / "policy").resolve())
    assert loaded.resolve(tmp_path, loaded.reference) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dporm-")]  # no temp file left


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 99}, "format_version 99"),
        ({"surprise": 1}, "unknown fields surprise"),
        ({"beta": -1}, "beta must be a positive"),
        ({"beta": float("nan")}, "beta must be a positive finite number, got nan"),
        ({"beta": float("inf")}, "beta must be a positive finite number, got inf"),
        ({"beta": True}, "beta must be a positive"),
        ({"policy": None}, "policy must be a model location"),
        ({"policy": 3}, "policy must be a model location"),
        ({"reference": ["r"]}, "reference must be a model location or null"),
        ({"tokenization": None}, "tokenization must be an object"),
        ({"metrics": []}, "metrics must be an object"),
        ({"adapter": "yes"}, "adapter must be true or false"),
        ({"tokenization": {"max_length": "512"}}, "tokenization.max_length must be an integer"),
        ({"tokenization": {"chat_template": 1}}, "tokenization.chat_template must be a string"),
        ({"normalize": "max"}, "normalize must be"),
        ({"adapter": True, "reference": None}, "needs the reference"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, change, message):
    raw = {"policy": "p", "reference": "r", "beta": 0.1, "format_version": 1} | change
    (tmp_path / FILENAME).write_text(json.dumps(raw))
    with pytest.raises(DpormError, match=message):
        Manifest.load(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(DpormError, match="not a dporm artifact"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("content", ["[]", "3", '"policy"', "null"])
def test_a_manifest_that_is_not_an_object_is_a_clear_error(tmp_path, content):
    (tmp_path / FILENAME).write_text(content)
    with pytest.raises(DpormError, match="expected a JSON object"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("content", ["[]", '{"policy": null, "reference": null, "beta": 0.1, "format_version": 1}',
                                     '{"policy": "p", "reference": null, "beta": 0.1, "tokenization": null, '
                                     '"format_version": 1}'])  # fmt: skip
def test_score_with_a_malformed_manifest_is_one_line(tmp_path, capsys, content):
    from dpo.cli import main

    (tmp_path / FILENAME).write_text(content)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert main(["score", str(tmp_path), "--data", str(data), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dporm:")]  # not the data loader's progress
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"dporm: error: {tmp_path / FILENAME}: ")


def test_relative_paths_resolve_inside_the_artifact_only(tmp_path, monkeypatch):
    artifact, cwd = tmp_path / "artifact", tmp_path / "cwd"
    artifact.mkdir()
    (cwd / "policy").mkdir(parents=True)
    (cwd / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(cwd)  # ./policy exists here, and must not be picked up
    m = Manifest("policy", "org/name", beta=0.1)
    assert m.resolve(artifact, "policy") == str((artifact / "policy").resolve())  # missing: an error when loaded
    assert m.resolve(artifact, "sub/dir/model") == str((artifact / "sub/dir/model").resolve())
    assert m.resolve(artifact, "org/name") == "org/name"  # a hub id
    assert m.resolve(artifact, "gpt2") == "gpt2"  # a legacy one-word hub id
    assert m.resolve(artifact, "reference") == str((artifact / "reference").resolve())  # dporm's own name: a path
    (artifact / "org" / "name").mkdir(parents=True)
    assert m.resolve(artifact, "org/name") == str((artifact / "org" / "name").resolve())  # inside the artifact
    assert m.resolve(artifact, str(cwd / "policy")) == str(cwd / "policy")  # absolute paths stay
    assert m.resolve(artifact, None) is None


def test_an_artifact_missing_its_policy_does_not_load_the_working_directorys(tmp_path, monkeypatch, capsys):
    from dpo.cli import main

    Manifest("policy", None, beta=0.1).save(tmp_path / "artifact")
    (tmp_path / "cwd" / "policy").mkdir(parents=True)
    (tmp_path / "cwd" / "policy" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "cwd")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert main(["score", str(tmp_path / "artifact"), "--data", str(data), "--device", "cpu"]) == 1
    assert f"{(tmp_path / 'artifact' / 'policy').resolve()}: no such model directory" in capsys.readouterr().err


def test_the_manifest_is_readable_as_any_file_the_user_writes(tmp_path):
    umask = os.umask(0o022)
    try:
        path = Manifest("policy", None, beta=0.1).save(tmp_path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
