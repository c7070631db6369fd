import pytest
import torch

import kernels.token_logprobs_torch as tl
from kernels import token_logprobs


def reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    safe = targets.masked_fill(targets == ignore_index, 0)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(targets == ignore_index, 0.0)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_matches_float64_reference(dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(6, vocab) * 3).to(dtype)
    targets = torch.randint(0, vocab, (6,))
    targets[2] = -100
    out = token_logprobs(logits, targets)
    assert out.dtype == torch.float32
    # Math is fp32 on the given (rounded) inputs, so compare with float64 on the same inputs.
    torch.testing.assert_close(out.double(), reference(logits, targets), atol=TOL[dtype] * vocab**0.5, rtol=1e-5)
    assert out[2] == 0


def test_hand_computed_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    out = token_logprobs(logits, torch.tensor([3, 0]))
    # Row 2: 1 - log(e + e^2 + e^3 + e^4) = -log(1 + e + e^2 + e^3).
    e = torch.e
    expected = torch.tensor([-torch.log(torch.tensor(4.0)), -torch.log(torch.tensor(1 + e + e**2 + e**3))])
    torch.testing.assert_close(out, expected)


def test_extreme_and_equal_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [5.0, 5.0, 5.0]])
    out = token_logprobs(logits, torch.tensor([0, 1, 2]))
    log3 = torch.log(torch.tensor(3.0))
    # fp32 spacing at 1e4 is ~1e-3, so the -1e4 row is exact only to that.
    torch.testing.assert_close(out, torch.tensor([0.0, -log3, -log3]), atol=2e-3, rtol=0)
    assert torch.isfinite(token_logprobs(logits, torch.tensor([1, 0, 0]))).all()


def test_all_ignored_rows_and_grad():
    logits = torch.randn(3, 11, requires_grad=True)
    targets = torch.full((3,), -100)
    out = token_logprobs(logits, targets)
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_custom_ignore_index():
    logits = torch.randn(4, 9)
    targets = torch.tensor([1, 5, 5, 0])
    out = token_logprobs(logits, targets, ignore_index=5)
    torch.testing.assert_close(out.double(), reference(logits, targets, ignore_index=5))


def test_three_d_and_non_contiguous():
    logits = torch.randn(2, 13, 5).transpose(1, 2)  # [2, 5, 13], non-contiguous
    targets = torch.randint(0, 13, (2, 5))
    assert not logits.is_contiguous()
    out = token_logprobs(logits, targets)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.double(), reference(logits, targets))
    strided_vocab = torch.randn(4, 20)[:, ::2]
    t = torch.randint(0, 10, (4,))
    torch.testing.assert_close(token_logprobs(strided_vocab, t).double(), reference(strided_vocab, t))


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(tl, "_CHUNK_ELEMENTS", 8)  # several row chunks in forward and backward
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 1, 2])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_matches_autograd_reference(dtype):
    logits = torch.randn(7, 50).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (7,))
    targets[0] = -100
    weights = torch.randn(7)
    (token_logprobs(logits, targets) * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    (reference(ref_logits, targets) * weights.double()).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(
        logits.grad.double(),
        ref_logits.grad,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
    )


def test_chunking_does_not_change_results(monkeypatch):
    logits = torch.randn(9, 31)
    targets = torch.randint(0, 31, (9,))
    whole = token_logprobs(logits, targets)
    monkeypatch.setattr(tl, "_CHUNK_ELEMENTS", 40)  # one row per chunk
    assert torch.equal(token_logprobs(logits, targets), whole)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
