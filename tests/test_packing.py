import threading

import pytest
import torch

import dpo.logprobs
from dpo.logprobs import sequence_logprobs
from dpo.packing import ATTENTION, Block, Packed, pack_groups, packable
from tests.conftest import make_tiny_llama
from tests.test_logprobs import SEQS, reference_logps, seq


def test_layout_of_a_packed_forward():
    pack = Packed()
    pack.add_group([1, 2, 3], [[4, 5, 6], [7, 8], [9], []])
    pack.add_group([10, 11], [[12, 13]])
    # head block: prompt + first response minus its last token; continuations: response minus its last token
    assert pack.input_ids == [1, 2, 3, 4, 5, 7, 10, 11, 12]
    assert pack.position_ids == [0, 1, 2, 3, 4, 3, 0, 1, 2]  # a continuation goes on after its prompt
    # row 2 (the prompt's last token) predicts every first response token
    assert pack.rows == [[2, 3, 4], [2, 5], [2], [], [7, 8]]
    head, cont, head2 = pack.blocks
    assert (head.start, head.length, head.mask) == (0, 5, None)
    assert (cont.start, cont.length, cont.prompt_start, cont.prompt_length) == (5, 1, 0, 3)
    assert cont.mask.tolist() == [[True, True, True, True]]
    assert (head2.start, head2.length, head2.mask) == (6, 3, None)


def test_continuation_mask_is_prompt_then_causal():
    pack = Packed()
    pack.add_group([1, 2], [[3], [4, 5, 6]])
    block = pack.blocks[1]
    assert block.mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_groups_are_packed_whole_up_to_the_budget():
    groups = [([1, 2, 3], [[4, 5], [6, 7]]), ([1], [[2, 3, 4, 5, 6, 7, 8, 9]]), ([1, 2], [[3]])]
    sizes = [len(p.input_ids) for p in pack_groups(groups, max_tokens=8)]
    assert sizes == [5, 8, 2]  # 5 + 8 > 8 starts a new pack; a group is never split
    assert [len(p.input_ids) for p in pack_groups(groups, max_tokens=100)] == [15]
    assert [len(p.input_ids) for p in pack_groups(groups[1:2], max_tokens=3)] == [8]  # longer than the budget alone


@pytest.mark.parametrize("budget", [1, 6, 1024])
def test_packed_log_probs_match_the_definition(tiny_llama, monkeypatch, budget):
    monkeypatch.setattr(dpo.logprobs, "PACK_TOKENS", budget)
    seqs = SEQS + [seq([1, 11], [])]
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, seqs, padded=False)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out.per_token(i).double(), reference_logps(tiny_llama, s), atol=1e-5, rtol=1e-5)


def _no_fallback(monkeypatch):
    monkeypatch.setattr(dpo.logprobs, "unpadded_logprobs", lambda *a: pytest.fail("fell back to unpadded"))


def test_cpu_default_packs_and_other_forwards_are_unchanged(monkeypatch):
    model = make_tiny_llama(seed=5)
    ids = torch.tensor([SEQS[1].input_ids])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _no_fallback(monkeypatch)
        sequence_logprobs(model, SEQS)
        assert model.config._attn_implementation == ATTENTION
        # Without a plan the packed attention is plain SDPA: full forwards and padded batches as before.
        assert torch.equal(model(input_ids=ids).logits, before)
        padded = sequence_logprobs(model, SEQS, padded=True)
    for i, s in enumerate(SEQS):
        torch.testing.assert_close(padded.per_token(i).double(), reference_logps(model, s), atol=1e-5, rtol=1e-5)


def test_concurrent_threads_on_one_model_get_their_own_results():
    model = make_tiny_llama(seed=6)
    with torch.no_grad():
        alone = [sequence_logprobs(model, [s]).logp for s in SEQS]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with torch.no_grad():
                results[k] = [sequence_logprobs(model, SEQS[i : i + 2]).logp for i in range(k % 2, len(SEQS), 2)]
        except BaseException as e:  # a thread's exception would only be a warning: the test must fail on it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [0, 1, 2, 3]
    for k, outs in results.items():
        for i, out in zip(range(k % 2, len(SEQS), 2), outs, strict=True):
            torch.testing.assert_close(out, torch.cat(alone[i : i + 2]), atol=1e-6, rtol=0)


def _assert_is_the_definition(model, out) -> None:
    for i, s in enumerate(SEQS):
        torch.testing.assert_close(out.per_token(i).double(), reference_logps(model, s), atol=1e-5, rtol=1e-5)


def test_sliding_window_models_are_not_packed():
    model = make_tiny_llama(sliding_window=4)
    assert not packable(model.config)
    assert not packable(type("C", (), {"layer_types": ["full_attention", "sliding_attention"]})())
    assert packable(type("C", (), {"layer_types": ["full_attention"] * 2, "sliding_window": 4})())
    with torch.no_grad():
        out = sequence_logprobs(model, SEQS, padded=False)
    assert model.config._attn_implementation == "sdpa"
    _assert_is_the_definition(model, out)


def test_eager_models_are_not_packed():
    model = make_tiny_llama(attn_implementation="eager")
    with torch.no_grad():
        out = sequence_logprobs(model, SEQS, padded=False)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(out.per_token(0).double(), reference_logps(model, SEQS[0]), atol=1e-5, rtol=1e-5)


def test_models_that_bypass_the_attention_interface_fall_back(monkeypatch):
    # As if the model's layers never called the registered attention: the plan sees no calls.
    model = make_tiny_llama(seed=7)
    monkeypatch.setattr(dpo.logprobs, "use_packed_attention", lambda config: True)
    with torch.no_grad():
        out = sequence_logprobs(model, SEQS, padded=False)
    assert model.config._attn_implementation == "sdpa"
    _assert_is_the_definition(model, out)


def test_block_defaults():
    assert Block(3, 2).mask is None
