import json

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
