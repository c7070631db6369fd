import pytest
import torch

from dpo.encoding import Encoded
from dpo.logprobs import batch_logprobs, sequence_logprobs, shared_prompt_logprobs
from tests.conftest import make_tiny_llama


def reference_logps(model, seq: Encoded) -> torch.Tensor:
    """One unpadded sequence, full logits, float64 log-softmax: the definition itself."""
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(seq.prompt_ids) - 1 :]


def seq(prompt, response):
    return Encoded(tuple(prompt), tuple(response))


SEQS = [
    seq([1, 5, 6, 7], [8, 9, 2]),
    seq([1, 11], [12, 13, 14, 15, 16, 2]),
    seq([1, 5, 6, 7], [20, 2]),
    seq([1, 5, 6, 7], [30, 31, 32, 33, 2]),
    seq([1, 40, 41, 42, 43, 44, 45], [46]),
]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("share", [True, False])
def test_matches_definition(tiny_llama, share, padded):
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, SEQS, share_prompts=share, padded=padded)
    assert out.logp.dtype == torch.float32
    assert out.tokens.tolist() == [len(s.response_ids) for s in SEQS]
    for i, s in enumerate(SEQS):
        ref = reference_logps(tiny_llama, s)
        torch.testing.assert_close(out.per_token(i).double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.logp[i].double(), ref.sum(), atol=1e-5, rtol=1e-5)
        assert torch.all(out.token_logps[i, len(s.response_ids) :] == 0)
    torch.testing.assert_close(out.mean, out.logp / out.tokens)


def test_prompt_sharing_equals_unshared(tiny_llama):
    prompt = [1, 3, 4, 5, 6, 7, 8, 9]
    responses = [[10, 11, 2], [12, 2], [13, 14, 15, 16, 17, 18, 2], [19]]
    with torch.no_grad():
        shared = shared_prompt_logprobs(tiny_llama, prompt, responses)
        plain = batch_logprobs(tiny_llama, [seq(prompt, r) for r in responses])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)


def test_padding_does_not_change_results(tiny_llama):
    with torch.no_grad():
        alone = batch_logprobs(tiny_llama, [SEQS[0]])
        padded = batch_logprobs(tiny_llama, SEQS[:2])
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-6, rtol=0)


def test_eager_attention_and_bf16_accumulate_in_fp32():
    model = make_tiny_llama(dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        out = sequence_logprobs(model, SEQS)
    assert out.logp.dtype == torch.float32 and out.token_logps.dtype == torch.float32
    ref = torch.stack([reference_logps(model, s).sum() for s in SEQS])
    torch.testing.assert_close(out.logp.double(), ref, atol=0.05, rtol=0.01)


def test_cpu_default_is_unpadded_and_matches_padded(tiny_llama):
    with torch.no_grad():
        default = sequence_logprobs(tiny_llama, SEQS)
        unpadded = sequence_logprobs(tiny_llama, SEQS, padded=False)
        padded = sequence_logprobs(tiny_llama, SEQS, padded=True)
    assert torch.equal(default.token_logps, unpadded.token_logps)
    torch.testing.assert_close(unpadded.token_logps, padded.token_logps, atol=1e-5, rtol=0)


def test_unpadded_results_do_not_depend_on_the_batch(tiny_llama):
    with torch.no_grad():
        together = sequence_logprobs(tiny_llama, SEQS, padded=False)
        alone = [sequence_logprobs(tiny_llama, [s], padded=False) for s in SEQS]
    for i, one in enumerate(alone):
        torch.testing.assert_close(together.per_token(i), one.per_token(0), atol=1e-6, rtol=0)


def test_uncroppable_cache_recomputes_the_prompt(tiny_llama, monkeypatch):
    from transformers import DynamicCache

    monkeypatch.setattr(DynamicCache, "is_croppable", property(lambda self: False), raising=False)
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: pytest.fail("crop called"))
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, SEQS, padded=False)
    for i, s in enumerate(SEQS):
        torch.testing.assert_close(out.per_token(i).double(), reference_logps(tiny_llama, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_gradients_flow_through_shared_prompt(padded):
    model = make_tiny_llama(seed=3).train()
    shared = sequence_logprobs(model, SEQS, share_prompts=True, padded=padded).logp.sum()
    shared.backward()
    grads_shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sequence_logprobs(model, SEQS, share_prompts=False).logp.sum().backward()
    for g_shared, p in zip(grads_shared, model.parameters(), strict=True):
        torch.testing.assert_close(g_shared, p.grad, atol=1e-5, rtol=1e-4)


def test_non_separable_head_falls_back_to_full_logits(tiny_llama, monkeypatch):
    import dpo.logprobs as lp

    monkeypatch.setattr(lp, "_separable_head", lambda model: None)
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, SEQS)
    for i, s in enumerate(SEQS):
        torch.testing.assert_close(out.per_token(i).double(), reference_logps(tiny_llama, s), atol=1e-5, rtol=1e-5)


def test_single_token_responses_and_empty_input(tiny_llama):
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, [seq([1, 5], [2]), seq([1, 5], [3])])
    assert out.tokens.tolist() == [1, 1]
    with pytest.raises(ValueError):
        sequence_logprobs(tiny_llama, [])


@pytest.mark.parametrize("padded", [True, False])
def test_empty_response_scores_zero(tiny_llama, padded):
    seqs = [seq([1, 5, 6], []), seq([1, 5, 6], [7, 2]), seq([1, 9], []), seq([1, 5, 6], [4])]
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, seqs, padded=padded)
    assert out.tokens.tolist() == [0, 2, 0, 1]
    assert out.logp[0] == 0 and out.logp[2] == 0 and out.mean[0] == 0
    torch.testing.assert_close(
        out.per_token(1).double(), reference_logps(tiny_llama, seq([1, 5, 6], [7, 2])), atol=1e-5, rtol=1e-5
    )


def _lora_head_model(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(seed=5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], lora_dropout=dropout)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # PEFT starts B at zero: make the adapter matter
    return model


def test_lora_wrapped_head_is_folded_and_exact():
    import dpo.logprobs as lp

    model = _lora_head_model().eval()
    head = lp._separable_head(model)
    assert head is not None and len(head.lora) == 1 and head.weight.shape[1] == 32 + 4
    with torch.no_grad():
        out = sequence_logprobs(model, SEQS)
        for i, s in enumerate(SEQS):
            torch.testing.assert_close(out.per_token(i).double(), reference_logps(model, s), atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            assert lp._separable_head(model).lora == []
            base = sequence_logprobs(model, SEQS)
            torch.testing.assert_close(
                base.per_token(0).double(), reference_logps(model, SEQS[0]), atol=1e-5, rtol=1e-5
            )
    assert not torch.allclose(out.logp, base.logp)


def test_lora_head_with_training_dropout_falls_back_to_full_logits():
    import dpo.logprobs as lp

    model = _lora_head_model(dropout=0.1).train()
    assert lp._separable_head(model) is None
    assert lp._separable_head(model.eval()) is not None
