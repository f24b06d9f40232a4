"""mHC's Sinkhorn in C (nanoseek/model/native.py) against the torch operations it replaces: forward and backward
equal to rounding in float64 for several n and token counts (blocks of 64 tokens, full and partial), large logits,
float32; it can be turned off; without a compiler a warning says why and the torch version runs."""

import pytest
import torch

from nanoseek.model import native
from nanoseek.model import residual as readable
from nanoseek.model import residual_kernels as kernels
from nanoseek.model.residual_kernels import sinkhorn

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine")


def torch_forward(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    m, _ = kernels._sinkhorn_in_place(kernels._tokens_last(logits), n_iters)
    return m.permute(2, 0, 1).reshape(logits.shape)


def torch_backward(grad: torch.Tensor, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """The readable Sinkhorn (residual.py) differentiated by autograd through every iteration."""
    logits = logits.detach().requires_grad_()
    (g,) = torch.autograd.grad((readable.sinkhorn(logits, n_iters) * grad).sum(), logits)
    return g


@pytest.fixture
def state():
    """native's module state, restored after the test."""
    saved = native._tried, native._library
    yield
    native._tried, native._library = saved


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("tokens", [1, 63, 64, 130])
def test_the_c_kernel_computes_what_the_torch_operations_do_in_float64(n, tokens):
    torch.manual_seed(n * 1000 + tokens)
    logits, grad = torch.randn(tokens, n, n, dtype=torch.float64) * 3, torch.randn(tokens, n, n, dtype=torch.float64)
    torch.testing.assert_close(native.sinkhorn_forward(logits, 20), torch_forward(logits, 20), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(
        native.sinkhorn_backward(grad, logits, 20), torch_backward(grad, logits, 20), rtol=1e-10, atol=1e-13
    )


def test_the_c_kernel_handles_underflowing_columns_float32_and_leading_dimensions():
    torch.manual_seed(0)
    huge = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 1000  # whole columns of exact zeros after exp: no 0/0
    out = native.sinkhorn_forward(huge, 20)
    assert out.shape == huge.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, torch_forward(huge, 20), rtol=1e-13, atol=1e-15)
    logits, grad = torch.randn(2, 100, 4, 4), torch.randn(2, 100, 4, 4)
    torch.testing.assert_close(native.sinkhorn_forward(logits, 20), torch_forward(logits, 20), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        native.sinkhorn_backward(grad, logits, 20), torch_backward(grad, logits, 20), rtol=1e-4, atol=1e-5
    )


def test_sinkhorn_uses_the_c_kernel_for_cpu_float_tensors_only():
    assert native.usable(torch.zeros(2, 4, 4)) and native.usable(torch.zeros(2, 4, 4, dtype=torch.float64))
    assert not native.usable(torch.zeros(2, 4, 4, dtype=torch.bfloat16))
    logits = torch.randn(10, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))  # through the operator, on the C kernel


def test_nanoseek_native_0_turns_it_off(state, monkeypatch):
    monkeypatch.setenv("NANOSEEK_NATIVE", "0")
    native._tried, native._library = False, None
    assert native.library() is None and not native.usable(torch.zeros(2, 4, 4))
    logits = torch.randn(70, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(logits, 20), torch_forward(logits, 20), rtol=0, atol=0)  # the torch path


def test_without_a_compiler_a_warning_says_why_and_torch_runs_it(state, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))  # no library built before
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._tried, native._library = False, None
    with pytest.warns(UserWarning, match="Sinkhorn runs on torch operations.*no-such-compiler"):
        assert native.library() is None
    logits = torch.randn(5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(logits, 20), torch_forward(logits, 20), rtol=0, atol=0)
