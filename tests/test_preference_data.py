import json
from pathlib import Path

import datasets
import pytest

from dpo.errors import DpormError
from dpo.preference_data import Columns, dialogue_to_messages, load_preferences, parse_rows

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"


def one(row, **kw):
    return parse_rows([row], **kw).examples[0]


def test_standard_strings():
    ex = one({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert (ex.prompt, ex.responses, ex.pairs, ex.row) == ("Q?", ("good", "bad"), ((0, 1),), 1)


def test_conversational_with_and_without_prompt():
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    ex = one({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello!"}],
              "rejected": [{"role": "assistant", "content": "Go away."}]})  # fmt: skip
    assert ex.prompt == prompt and ex.responses == ("Hello!", "Go away.")
    user = {"role": "user", "content": "Hi"}
    ex = one({"chosen": [user, {"role": "assistant", "content": "Hello!"}],
              "rejected": [user, {"role": "assistant", "content": "Go away."}]})  # fmt: skip
    assert ex.prompt == [user] and ex.responses == ("Hello!", "Go away.")
    ex = one({"prompt": "Hi", "chosen": [user, {"role": "assistant", "content": "A"}],
              "rejected": [user, {"role": "assistant", "content": "B"}]})  # fmt: skip
    assert ex.prompt == "Hi" and ex.responses == ("A", "B")


def test_implicit_prompt_dialogues():
    ex = one({"chosen": HH + " An apple.", "rejected": HH + " A rock."})
    assert ex.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert ex.responses == ("An apple.", "A rock.")
    # Responses that begin alike: the prompt still ends at the last shared 'Assistant:'.
    ex = one({"chosen": HH + " An apple a day.", "rejected": HH + " An orange."})
    assert ex.responses == ("An apple a day.", "An orange.")
    assert dialogue_to_messages("\n\nHuman: a\n\nAssistant:") == [{"role": "user", "content": "a"}]


def test_rankings_by_scores_and_ranks():
    ex = one({"prompt": "Q", "responses": ["ok", "best", "worst"], "scores": [5, 9, 1]})
    assert ex.responses == ("best", "ok", "worst")
    assert ex.pairs == ((0, 1), (0, 2), (1, 2))
    ex = one({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 1, 2]})
    assert ex.responses == ("b", "a", "c") and ex.pairs == ((0, 1), (0, 2))  # the tie (a, c) gives no pair


def test_column_mapping():
    cols = Columns(prompt="question", chosen="good", rejected="bad")
    ex = one({"question": "Q", "good": "y", "bad": "n"}, cols=cols)
    assert ex.responses == ("y", "n")


def test_bad_rows_are_reported_with_row_numbers_and_skipped():
    rows = [
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": "Q", "chosen": 3, "rejected": "b"},
        {"prompt": "Q", "chosen": "a"},
        {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 1]},
        {"prompt": "Q", "responses": ["a", "b"], "scores": ["x", 1]},
    ]
    data = parse_rows(rows)
    assert [e.row for e in data.examples] == [1]
    reasons = dict(data.skipped)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert "identical" in reasons[2] and "empty" in reasons[3] and "not a string" in reasons[4]
    assert "missing" in reasons[5] and "same score" in reasons[6] and "numbers" in reasons[7]
    with pytest.raises(DpormError, match="row 2: chosen and rejected are identical"):
        parse_rows(rows, strict=True)
    with pytest.raises(DpormError, match="no usable preference rows"):
        parse_rows(rows[1:])


def test_a_missing_prompt_column_is_named():
    row = {"question": "Q?", "chosen": "yes", "rejected": "no"}
    with pytest.raises(DpormError, match="no 'query' field, and not an implicit-prompt dialogue"):
        parse_rows([row], Columns(prompt="query"), strict=True)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "saved", "jsonl.gz"])
def test_local_sources(tmp_path, kind):
    rows = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind in ("jsonl", "jsonl.gz"):
        import gzip

        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith("gz") else text.encode())
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(path))
    data = load_preferences(str(path))
    assert [e.prompt for e in data.examples] == ["Q0", "Q1", "Q2"]


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(DpormError, match="no such file"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(DpormError, match="unsupported file type"):
        load_preferences(str(bad))


def test_a_missing_split_of_a_saved_dataset_dict_names_the_splits(tmp_path):
    rows = [{"prompt": "Q", "chosen": "yes", "rejected": "no"}]
    splits = {"test": datasets.Dataset.from_list(rows), "dev": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DpormError, match="no split 'train'; it has 'test', 'dev' \\(choose with --split\\)"):
        load_preferences(str(tmp_path / "dd"))
    assert len(load_preferences(str(tmp_path / "dd"), split="dev").examples) == 1


def test_fingerprint_tracks_content():
    a = parse_rows([{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    b = parse_rows([{"prompt": "Q", "chosen": "a", "rejected": "c"}])
    assert a.fingerprint() == parse_rows([{"prompt": "Q", "chosen": "a", "rejected": "b"}]).fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.skipif(not (SHARED / "hh-rlhf").is_dir(), reason="needs ../shared/data")
def test_real_hh_rlhf_helpful_base():
    messages = []
    data = load_preferences(str(SHARED / "hh-rlhf/helpful-base/test.jsonl.gz"), report=messages.append)
    assert len(data.examples) + len(data.skipped) == 2354
    # 2 identical pairs, 3 empty rejected replies, 1 dialogue with an empty turn, and 9 whose chosen and rejected
    # part before their last turn (a "response" would hold further turns)
    reasons = [why for _, why in data.skipped]
    assert len(reasons) == 15 and reasons.count("chosen and rejected are identical") == 2
    assert reasons.count("'rejected' is empty") == 3 and sum("empty turn" in r for r in reasons) == 1
    assert sum("differ before their last assistant turn" in r for r in reasons) == 9
    assert messages and messages[0].startswith(f"skipped {len(data.skipped)} unusable row(s)")
    for ex in data.examples[:50]:
        assert isinstance(ex.prompt, list) and ex.prompt[-1]["role"] == "user"
        assert all(r and not r.startswith(" ") for r in ex.responses)


def test_dialogue_turns_and_ranking_numbers_are_checked():
    from dpo.preference_data import RowError, dialogue_to_messages, split_implicit_prompt

    assert dialogue_to_messages("\n\nHuman: q\n\nAssistant:") == [{"role": "user", "content": "q"}]
    with pytest.raises(RowError, match="empty turn"):  # only the assistant turn to generate may be empty
        dialogue_to_messages("\n\nHuman: q\n\nAssistant: a\n\nHuman:\n\nAssistant:")
    with pytest.raises(RowError, match="differ before their last assistant turn"):
        split_implicit_prompt("\n\nHuman: q\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: x",
                              "\n\nHuman: q\n\nAssistant: b")  # fmt: skip
    bad = ([1, float("nan"), 2], "21", [1, True, 2])
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": s} for s in (*bad, [1, 2, 3])]
    assert [why for _, why in parse_rows(rows).skipped] == [f"'scores' must be a list of finite numbers, got {s}"
                                                            for s in ("[1, nan, 2]", "21", "[1, True, 2]")]  # fmt: skip
    ranked = parse_rows([{"prompt": "p", "responses": ["r0", "r1", "r2"], "ranking": [2, 3, 1]}]).examples[0]
    assert ranked.responses == ("r2", "r0", "r1")  # each response's rank, 1 = best
