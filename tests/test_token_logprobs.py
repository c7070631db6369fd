"""kernels.token_logprobs on both implementations (Triton runs under TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

import kernels.torch_backend as torch_backend
from kernels import token_logprobs
from kernels.backend import backend_name
from kernels.linear_logprobs import linear_token_logprobs
from tests.conftest import on_triton_device


def reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    safe = targets.masked_fill(targets == ignore_index, 0)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(targets == ignore_index, 0.0)


# fp32 math on the given (already rounded) inputs: the error is fp32 rounding of a logsumexp.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# Gradients are rounded once to the logits' dtype: relative tolerances of about one step (bf16 2^-8, fp16 2^-11).
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-7, 8e-3), torch.float16: (1e-7, 1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 1000, 49152, 50257])
def test_matches_float64_reference(kernel_backend, dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(3, vocab) * 4).to(dtype)
    targets = torch.randint(0, vocab, (3,))
    targets[1] = -100
    out = token_logprobs(logits, targets)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out.double(), reference(logits, targets), atol=ATOL[dtype], rtol=1e-5)
    assert out[1] == 0


def test_hand_computed_values(kernel_backend):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    out = token_logprobs(logits, torch.tensor([3, 0]))
    # Row 2: 1 - log(e + e^2 + e^3 + e^4) = -log(1 + e + e^2 + e^3).
    e = torch.e
    expected = torch.tensor([-torch.log(torch.tensor(4.0)), -torch.log(torch.tensor(1 + e + e**2 + e**3))])
    torch.testing.assert_close(out, expected)


def test_extreme_and_equal_logits(kernel_backend):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [5.0, 5.0, 5.0]])
    out = token_logprobs(logits, torch.tensor([0, 1, 2]))
    log3 = torch.log(torch.tensor(3.0))
    # fp32 spacing at 1e4 is ~1e-3, so the -1e4 row is exact only to that.
    torch.testing.assert_close(out, torch.tensor([0.0, -log3, -log3]), atol=2e-3, rtol=0)
    assert torch.isfinite(token_logprobs(logits, torch.tensor([1, 0, 0]))).all()


def test_all_ignored_rows_and_grad(kernel_backend):
    logits = torch.randn(3, 11, requires_grad=True)
    out = token_logprobs(logits, torch.full((3,), -100))
    assert torch.equal(out, torch.zeros(3))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_custom_ignore_index(kernel_backend):
    logits = torch.randn(4, 9)
    targets = torch.tensor([1, 5, 5, 0])
    out = token_logprobs(logits, targets, ignore_index=5)
    torch.testing.assert_close(out.double(), reference(logits, targets, ignore_index=5))


def test_three_d_and_non_contiguous(kernel_backend):
    logits = torch.randn(2, 13, 5).transpose(1, 2)  # [2, 5, 13], non-contiguous
    targets = torch.randint(0, 13, (2, 5))
    assert not logits.is_contiguous()
    out = token_logprobs(logits, targets)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.double(), reference(logits, targets))
    strided_vocab = torch.randn(4, 20)[:, ::2]
    t = torch.randint(0, 10, (4,))
    torch.testing.assert_close(token_logprobs(strided_vocab, t).double(), reference(strided_vocab, t))
    row_strided = torch.randn(6, 10)[::2]  # unit vocab stride, row stride 20: used in place
    t = torch.randint(0, 10, (3,))
    torch.testing.assert_close(token_logprobs(row_strided, t).double(), reference(row_strided, t))
    base = torch.randn(6, 10, requires_grad=True)  # the backward reads and writes with each row stride
    token_logprobs(base[::2], t).sum().backward()
    leaf = base.detach().double().requires_grad_()
    reference(leaf[::2], t).sum().backward()
    torch.testing.assert_close(base.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)
    assert base.grad[1::2].abs().sum() == 0  # rows between the strided ones get no gradient


def test_the_vocabulary_block_is_capped_and_inputs_checked():
    from kernels import triton_backend

    assert triton_backend._block(151936) == triton_backend.MAX_BLOCK_V  # a GPU's registers hold one block
    assert triton_backend._block(7) == 8
    with pytest.raises(ValueError, match="no vocabulary dimension"):
        token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    meta = torch.randn(3, 5, device="meta")
    with pytest.raises(ValueError, match="put them on one device"):
        token_logprobs(meta, torch.zeros(3, dtype=torch.long))


def test_gradcheck_float64_torch_path(monkeypatch):
    monkeypatch.setenv("DPORM_KERNEL", "torch")
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 8)  # several row chunks in forward and backward
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 1, 2])
    assert token_logprobs(logits, targets).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 1000, 50257])
def test_grad_matches_reference(kernel_backend, dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(3, 2, vocab) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (3, 2))
    targets[0, 1] = -100
    weights = torch.randn(3, 2)
    (token_logprobs(logits, targets) * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    (reference(ref_logits, targets) * weights.double()).sum().backward()
    assert logits.grad.dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=atol, rtol=rtol)


def test_backends_agree(monkeypatch, request):
    on_triton_device(request)
    torch.manual_seed(0)
    logits = torch.randn(4, 3000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 3000, (4,))
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("DPORM_KERNEL", name)
        logits.grad = None
        out = token_logprobs(logits, targets)
        out.sum().backward()
        results[name] = (out.detach(), logits.grad.clone())
    torch.testing.assert_close(results["torch"][0], results["triton"][0], atol=1e-5, rtol=1e-5)
    # Both round one float32 gradient to bf16 (softmax entries here are ~3e-4): at most one bf16 step apart.
    torch.testing.assert_close(results["torch"][1], results["triton"][1], atol=1e-7, rtol=8e-3)


def test_chunking_does_not_change_results(monkeypatch):
    monkeypatch.setenv("DPORM_KERNEL", "torch")
    logits = torch.randn(9, 31)
    targets = torch.randint(0, 31, (9,))
    whole = token_logprobs(logits, targets)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 40)  # one row per chunk
    assert torch.equal(token_logprobs(logits, targets), whole)


def test_triton_kernels_really_run(monkeypatch, request):
    """Fails if the torch path ran in place of the Triton kernels."""
    on_triton_device(request)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch path used")

    monkeypatch.setenv("DPORM_KERNEL", "triton")
    monkeypatch.setattr(torch_backend, "forward", forbidden)
    monkeypatch.setattr(torch_backend, "backward", forbidden)
    import kernels.triton_backend as triton_backend

    launches = []
    for kernel in ("_forward_kernel", "_backward_kernel"):
        original = getattr(triton_backend, kernel)
        monkeypatch.setattr(triton_backend, kernel, _Spy(original, kernel, launches))
    logits = torch.randn(2, 100, requires_grad=True)
    token_logprobs(logits, torch.tensor([3, 7])).sum().backward()
    assert launches == ["_forward_kernel", "_backward_kernel"]
    assert logits.grad is not None and backend_name(logits) == "triton"


class _Spy:
    """Records ``kernel[grid](...)`` launches and forwards them to the real Triton kernel."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("DPORM_KERNEL", "auto")
    assert backend_name(cpu) == "torch"  # Triton runs on CPU only when forced
    monkeypatch.setenv("DPORM_KERNEL", "torch")
    assert backend_name(cpu) == "torch"
    monkeypatch.setenv("DPORM_KERNEL", "cuda-magic")
    with pytest.raises(ValueError, match="DPORM_KERNEL"):
        backend_name(cpu)
    monkeypatch.setenv("DPORM_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="not on CUDA"):
        backend_name(cpu)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))


def test_a_leading_block_of_minus_infinity_is_not_nan(kernel_backend, monkeypatch):
    import kernels.triton_backend as triton_backend

    monkeypatch.setattr(triton_backend, "MAX_BLOCK_V", 4)  # the first block holds only -inf
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 8)
    inf = float("inf")
    logits = torch.tensor([[-inf] * 5 + [0.0, 1.0, -inf], [2.0] * 8], requires_grad=True)
    out = token_logprobs(logits, torch.tensor([6, 0]))
    expected = torch.tensor([-torch.log1p(torch.exp(torch.tensor(-1.0))), -torch.log(torch.tensor(8.0))])
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, :5].eq(0).all()


def test_targets_outside_the_vocabulary_are_an_error(kernel_backend):
    for bad in ([5, -100], [-1, 0], [0, 2**40]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            token_logprobs(torch.randn(2, 5), torch.tensor(bad))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.tensor(bad))
    assert token_logprobs(torch.randn(2, 5), torch.tensor([7, 4]), ignore_index=7)[0] == 0


def test_ignored_padding_rows_with_nan_logits_give_zero_not_nan(kernel_backend):
    logits = torch.randn(3, 10)
    logits[1] = float("nan")  # e.g. garbage in a padding row
    logits.requires_grad_()
    targets = torch.tensor([2, -100, 9])
    out = token_logprobs(logits, targets)
    assert out[1] == 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 2]].detach().double(), reference(logits.detach()[[0, 2]], targets[[0, 2]]))
    out.sum().backward()
    assert logits.grad[1].eq(0).all() and torch.isfinite(logits.grad).all()


def test_zero_rows(kernel_backend):
    logits = torch.randn(0, 10, requires_grad=True)
    out = token_logprobs(logits, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert logits.grad.shape == (0, 10)


def test_float64_always_takes_the_float64_torch_path(monkeypatch):
    monkeypatch.setenv("DPORM_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_name(torch.zeros(1, dtype=torch.float64)) == "torch"
    assert backend_name(torch.zeros(1)) == "triton"


def test_a_target_logit_of_minus_infinity_gives_finite_gradients(kernel_backend):
    """An impossible target (a vocabulary masked with -inf) has logp -inf; its row's gradient is still finite."""
    inf = float("inf")
    logits = torch.tensor([[0.0, 1.0, -inf], [0.0, 1.0, 2.0]], requires_grad=True)
    out = token_logprobs(logits, torch.tensor([2, 1]))
    assert out[0] == -inf
    out[1].backward()  # row 0's incoming gradient is 0
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[1] = -torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    expected[1, 1] += 1
    torch.testing.assert_close(logits.grad.double(), expected, atol=1e-6, rtol=1e-6)


def test_double_backward_is_an_error_not_a_silent_zero(kernel_backend):
    logits = torch.randn(2, 5, requires_grad=True)
    hidden, weight = torch.randn(2, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    for out, inputs in ((token_logprobs(logits, torch.tensor([1, 4])), (logits,)),
                        (linear_token_logprobs(hidden, weight, torch.tensor([1, 4])), (hidden, weight))):  # fmt: skip
        grads = torch.autograd.grad(out.sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|second"):
            sum(g.square().sum() for g in grads).backward()
