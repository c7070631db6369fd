import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from dpo.encoding import Encoded, encode, render_chat
from dpo.errors import EncodingError, ResponseTooLongError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CODE_RESPONSE = "    def f():\n        return 1"


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def no_template(smollm_tokenizer):
    """The SmolLM2 tokenizer with its chat template removed (a base-model tokenizer)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(smollm_tokenizer.backend_tokenizer.to_str()), eos_token="<|im_end|>"
    )
    assert not tok.chat_template
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(smollm_tokenizer):
    """A tokenizer that adds BOS itself *and* whose template writes BOS (Llama-3 style)."""
    backend = Tokenizer.from_str(smollm_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert tok("x")["input_ids"][0] == 0
    return tok


def test_string_prompt_is_one_user_message(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = encode(tok, "What is 2+2?", "4")
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert list(enc.prompt_ids) == ids(tok, prompt_text)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False
    )
    # The assistant turn's closing tokens belong to the response, so they are scored.
    assert tok.convert_ids_to_tokens(list(enc.response_ids)) == ["4", "<|im_end|>", "Ċ"]
    assert enc.response_mask == [0] * len(enc.prompt_ids) + [1] * 3
    assert not enc.truncated
    assert encode(tok, [{"role": "user", "content": "What is 2+2?"}], "4") == enc


def test_prompt_newline_does_not_merge_with_leading_spaces(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = encode(tok, "Write f.", CODE_RESPONSE)
    prompt_text, response_text = render_chat(tok, "Write f.", CODE_RESPONSE)
    one_go = ids(tok, prompt_text + response_text)
    assert one_go != enc.input_ids  # tokenizing the full text merges "\n" + "   " across the boundary
    assert tok.convert_ids_to_tokens(one_go[len(enc.prompt_ids) - 1]) == "ĊĠĠĠ"
    assert enc.prompt_ids[-1] == ids(tok, "\n")[0]
    assert tok.convert_ids_to_tokens(enc.response_ids[0]) == "ĠĠĠ"
    assert list(enc.response_ids) == ids(tok, response_text)
    assert tok.decode(enc.input_ids) == prompt_text + response_text


def test_multi_turn_messages_with_system(smollm_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    enc = encode(smollm_tokenizer, messages, "Goodbye.")
    text = smollm_tokenizer.decode(enc.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and "You are a helpful" not in text
    assert smollm_tokenizer.decode(enc.response_ids) == "Goodbye.<|im_end|>\n"


def test_empty_and_unicode_responses(smollm_tokenizer):
    tok = smollm_tokenizer
    empty = encode(tok, "Say nothing.", "")
    assert tok.convert_ids_to_tokens(list(empty.response_ids)) == ["<|im_end|>", "Ċ"]
    text = "Café — 日本語 🎉 naïve ∑"
    enc = encode(tok, "Unicode please", text)
    assert tok.decode(enc.response_ids) == text + "<|im_end|>\n"


def test_template_that_does_not_extend_the_prompt_is_an_error(smollm_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=smollm_tokenizer.backend_tokenizer)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(EncodingError, match="does not start with"):
        encode(tok, "a", "b")


def test_no_doubled_bos(bos_tokenizer):
    enc = encode(bos_tokenizer, "Hi", "Hello")
    assert enc.input_ids[0] == 0 and enc.input_ids[1] != 0
    assert enc.input_ids.count(0) == 1


def test_without_template_plain_concatenation(no_template, bos_tokenizer):
    enc = encode(no_template, "The sky is", " blue.")
    assert list(enc.prompt_ids) == ids(no_template, "The sky is")
    assert list(enc.response_ids) == [*ids(no_template, " blue."), no_template.eos_token_id]
    bos_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    with_bos = encode(bos_tokenizer, "The sky is", " blue.")
    assert with_bos.prompt_ids[0] == 0 and 0 not in with_bos.response_ids  # the tokenizer's own rule: BOS once
    with pytest.raises(EncodingError, match="no chat template"):
        encode(no_template, [{"role": "user", "content": "hi"}], "x")
    with pytest.raises(EncodingError, match="no tokens"):
        encode(no_template, "", "x")


def test_truncation_cuts_the_prompt_from_the_left(bos_tokenizer):
    full = encode(bos_tokenizer, "one two three four five six seven eight nine ten", "The end.")
    cut = encode(
        bos_tokenizer, "one two three four five six seven eight nine ten", "The end.", max_length=len(full) - 4
    )
    assert cut.truncated and len(cut) == len(full) - 4
    assert cut.response_ids == full.response_ids
    assert cut.prompt_ids[0] == 0  # BOS kept in front
    assert cut.prompt_ids[1:] == full.prompt_ids[5:]
    assert encode(bos_tokenizer, "one", "The end.", max_length=len(full)) == encode(bos_tokenizer, "one", "The end.")


def test_response_longer_than_limit(smollm_tokenizer):
    long = "word " * 50
    with pytest.raises(ResponseTooLongError, match="max_length=20"):
        encode(smollm_tokenizer, "Talk", long, max_length=20)
    enc = encode(smollm_tokenizer, "Talk", long, max_length=20, allow_response_truncation=True)
    assert enc.truncated and len(enc) == 20 and len(enc.prompt_ids) == 1 and len(enc.response_ids) == 19


def test_bad_inputs_are_encoding_errors(smollm_tokenizer):
    with pytest.raises(EncodingError, match="response must be a string"):
        encode(smollm_tokenizer, "hi", None)
    with pytest.raises(EncodingError, match="content"):
        encode(smollm_tokenizer, [{"role": "user", "content": 3}], "x")


@pytest.mark.skipif(not (SHARED / "rewardbench").is_dir(), reason="needs ../shared/data")
def test_rewardbench_code_rows_split_on_token_ids(smollm_tokenizer):
    rows = [json.loads(line) for line in (SHARED / "rewardbench" / "filtered-sample.jsonl").open()]
    merged = 0
    for row in rows:
        prompt_text, response_text = render_chat(smollm_tokenizer, row["prompt"], row["chosen"])
        enc = encode(smollm_tokenizer, row["prompt"], row["chosen"])
        assert list(enc.prompt_ids) == ids(smollm_tokenizer, prompt_text)
        merged += ids(smollm_tokenizer, prompt_text + response_text) != enc.input_ids
    assert merged >= len([r for r in rows if r["subset"].startswith("hep-")])


def test_the_responses_of_one_prompt_share_one_prompt_cut(smollm_tokenizer):
    """A long rejected response must not leave the chosen one with more context: both get the shorter prompt."""
    from dpo.encoding import encode_responses

    prompt, short, long = "word " * 40, "short", "long " * 12
    alone = [encode(smollm_tokenizer, prompt, r, max_length=40) for r in (short, long)]
    assert len(alone[0].prompt_ids) > len(alone[1].prompt_ids)  # cut apart, they would differ
    pair = list(encode_responses(smollm_tokenizer, prompt, [short, long], max_length=40))
    assert pair[0].prompt_ids == pair[1].prompt_ids == alone[1].prompt_ids and all(s.truncated for s in pair)
    assert [s.response_ids for s in pair] == [s.response_ids for s in alone]
    uncut = [encode(smollm_tokenizer, "Hi.", r, max_length=40) for r in ("a", "b")]
    assert list(encode_responses(smollm_tokenizer, "Hi.", ["a", "b"], max_length=40)) == uncut  # nothing cut
    with pytest.raises(ResponseTooLongError):  # a response that cannot fit still fails at its own item
        list(encode_responses(smollm_tokenizer, prompt, [short, "x " * 60], max_length=40))


def test_max_response_tokens_keeps_each_responses_first_tokens(smollm_tokenizer):
    from dpo.encoding import encode_responses

    prompt, responses = "Name two colours.", ["Blue and green, both calm colours.", "Red."]
    whole = [encode(smollm_tokenizer, prompt, r) for r in responses]
    n = len(whole[1].response_ids)  # the short response has exactly n tokens: not cut, not flagged
    assert len(whole[0].response_ids) > n
    capped = list(encode_responses(smollm_tokenizer, prompt, responses, max_response_tokens=n))
    assert capped[0] == Encoded(whole[0].prompt_ids, whole[0].response_ids[:n], True)
    assert capped[1] == whole[1]
    long, room = "long " * 60, len(whole[0].prompt_ids) + 8  # over max_length alone; its first 8 tokens fit
    fit = next(encode_responses(smollm_tokenizer, prompt, [long], max_length=room, max_response_tokens=8))
    assert fit.prompt_ids == whole[0].prompt_ids and len(fit.response_ids) == 8 and fit.truncated
