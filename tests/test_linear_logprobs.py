"""kernels.linear_token_logprobs: log-probs from hidden states + LM head in token chunks."""

import pytest
import torch

import kernels.linear_logprobs as linear_module
from kernels import linear_token_logprobs


def reference(hidden, weight, targets, bias=None, ignore_index=-100, logits_dtype=torch.float64):
    """float64 log-probs; the logits first rounded to ``logits_dtype``, as a bf16 LM head's matmul writes them."""
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    logits = logits.to(logits_dtype).double()  # rounding only: the gradient passes straight through
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(targets == ignore_index, 0.0)


def make(n, hidden_size, vocab, dtype, seed=0, bias=False):
    torch.manual_seed(seed)
    h = torch.randn(n, hidden_size).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden_size) / hidden_size**0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, vocab, (n,))
    t[0] = -100
    return h, w, b, t


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks even on small inputs."""
    monkeypatch.setattr(linear_module, "CHUNK_ELEMENTS", 2000)


# bf16 logits come from a bf16 matmul (as the model's own head computes them); the reference rounds its logits
# the same way, so what is left is a logit rounded to the other neighbour (one bf16 step, 2^-7 at |z| ~ 2) and
# the bf16 rounding of G and of grad_h = G·W (one step, 2^-8 relative, of terms that partly cancel).
FWD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (8e-3, 0)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (4e-3, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,bias", [(7, False), (1000, True), (50257, False)])
def test_forward_and_grads_match_reference(kernel_backend, small_chunks, dtype, vocab, bias):
    h, w, b, t = make(5, 16, vocab, dtype, bias=bias)
    g = torch.randn(5)
    out = linear_token_logprobs(h, w, t, bias=b)
    assert out.dtype == torch.float32 and out[0] == 0
    (out * g).sum().backward()
    params = [h, w] + ([b] if bias else [])
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = reference(ref_params[0], ref_params[1], t, ref_params[2] if bias else None, logits_dtype=dtype)
    (ref * g.double()).sum().backward()
    atol, rtol = FWD_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    atol, rtol = GRAD_TOL[dtype]
    if dtype == torch.bfloat16 and kernel_backend == "triton" and not torch.cuda.is_available():
        atol = 1e-2  # TRITON_INTERPRET=1 casts float32 to bf16 by truncation: G's error no longer cancels in G·W
    for p, r in zip(params, ref_params, strict=True):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), r.grad, atol=atol, rtol=rtol)


def test_gradcheck_float64(monkeypatch, small_chunks):
    monkeypatch.setenv("DPORM_KERNEL", "torch")
    h, w, b, t = make(6, 4, 9, torch.float64, bias=True)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_token_logprobs(h, w, t, bias=b), (h, w, b))


def test_three_d_input_and_frozen_weight(kernel_backend):
    torch.manual_seed(1)
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(11, 8)  # frozen: no grad_weight is computed
    t = torch.randint(0, 11, (2, 3))
    out = linear_token_logprobs(h, w, t)
    assert out.shape == (2, 3)
    out.sum().backward()
    torch.testing.assert_close(out.double(), reference(h.detach(), w, t), atol=1e-5, rtol=1e-5)
    assert h.grad.shape == h.shape and w.grad is None


def test_chunking_does_not_change_results(kernel_backend, monkeypatch):
    """Token chunks (backward; forward off the CPU) and the CPU forward's row and vocabulary tiles, all with ragged
    ends, give the values and gradients of one whole pass."""
    h, w, b, t = make(9, 8, 50, torch.float32, bias=True)
    g = torch.randn(9)

    def run() -> list[torch.Tensor]:
        params = [p.detach().clone().requires_grad_() for p in (h, w, b)]
        out = linear_token_logprobs(params[0], params[1], t, bias=params[2])
        (out * g).sum().backward()
        return [out.detach()] + [p.grad for p in params]

    whole = run()
    monkeypatch.setattr(linear_module, "CHUNK_ELEMENTS", 100)  # two tokens per chunk: 5 chunks, the last of one
    monkeypatch.setattr(linear_module, "CPU_ROWS", 4)  # row tiles of 4, 4, 1
    monkeypatch.setattr(linear_module, "VOCAB_BLOCK", 16)  # vocabulary tiles of 16, 16, 16, 2
    chunked = run()
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    ref_params = [p.detach().double().requires_grad_() for p in (h, w, b)]
    ref = reference(ref_params[0], ref_params[1], t, ref_params[2])
    (ref * g.double()).sum().backward()
    for got, want in zip(chunked, [ref.detach()] + [p.grad for p in ref_params], strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="do not match"):
        linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size"):
        linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,bias", [(7, False), (1000, True)])
def test_cpu_vocabulary_tiles_match_reference(monkeypatch, dtype, vocab, bias):
    """The CPU forward's running logsumexp over tiles, with partial last tiles in both directions."""
    monkeypatch.setenv("DPORM_KERNEL", "torch")
    monkeypatch.setattr(linear_module, "VOCAB_BLOCK", 3)
    monkeypatch.setattr(linear_module, "CPU_ROWS", 2)
    h, w, b, t = make(5, 16, vocab, dtype, bias=bias)
    t[1], t[2] = vocab - 1, 0  # targets in the last (partial) tile and the first
    logp, lse = linear_module._tiled_forward(h.detach(), w.detach(), None if b is None else b.detach(), t, -100)
    ref = reference(h.detach(), w.detach(), t, None if b is None else b.detach())
    atol, rtol = FWD_TOL[dtype]
    torch.testing.assert_close(logp.double(), ref, atol=atol, rtol=rtol)
    logits = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=atol, rtol=rtol)
    assert logp[0] == 0 and logp.dtype == torch.float32
    monkeypatch.setattr(linear_module, "VOCAB_BLOCK", 2048)
    monkeypatch.setattr(linear_module, "CPU_ROWS", 512)
    whole, _ = linear_module._tiled_forward(h.detach(), w.detach(), None if b is None else b.detach(), t, -100)
    torch.testing.assert_close(whole, logp, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_a_leading_tile_of_minus_infinity_is_not_nan(kernel_backend, monkeypatch):
    monkeypatch.setattr(linear_module, "VOCAB_BLOCK", 4)  # the CPU forward's first vocabulary tile is all -inf
    h, w = torch.randn(2, 3), torch.randn(8, 3)
    bias = torch.tensor([float("-inf")] * 5 + [0.0, 0.0, 0.0])
    t = torch.tensor([6, 7])
    out = linear_token_logprobs(h, w, t, bias=bias)
    torch.testing.assert_close(out.double(), reference(h, w, t, bias))
    assert torch.isfinite(out).all()


def test_mixed_dtypes_are_a_clear_error():
    with pytest.raises(TypeError, match="share a dtype"):
        linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3).bfloat16(), torch.tensor([1, 2]))


def test_non_finite_hidden_states_in_ignored_rows_stay_out_of_the_gradients(kernel_backend, small_chunks):
    h, w, b, t = make(6, 8, 50, torch.float32, bias=True)
    h = h.detach().clone()
    h[0] = float("nan")  # t[0] is ignored: e.g. garbage in a padding row
    h[3, 2] = float("inf")
    t[3] = -100
    h.requires_grad_()
    out = linear_token_logprobs(h, w, t, bias=b)
    g = torch.randn(6)
    (out * g).sum().backward()
    assert torch.isfinite(out).all() and out[0] == 0 and out[3] == 0
    kept = [1, 2, 4, 5]
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (reference(h.detach()[kept], w2, t[kept], b2) * g[kept].double()).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-5, rtol=1e-5)
    assert h.grad[[0, 3]].eq(0).all() and torch.isfinite(h.grad).all()
