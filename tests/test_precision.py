"""Float32MatmulsForBf16 gives what torch's bf16 matmuls give, forward and backward."""

import contextlib

import pytest
import torch

from kd_lightning import precision
from kd_lightning.precision import Float32MatmulsForBf16, cpu_bf16_matmuls


def bf16(*shape):
    return torch.randn(*shape, dtype=torch.float64).to(torch.bfloat16)


MATMULS = {
    "linear": lambda x, w, b: torch.nn.functional.linear(x, w, b),
    "mm": lambda x, w, b: x @ w.T,
    "addmm": lambda x, w, b: torch.addmm(b, x, w.T),
    "bmm": lambda x, w, b: torch.bmm(x.view(4, 3, 16), w.T.reshape(4, 16, 6)),
    "baddbmm": lambda x, w, b: torch.baddbmm(b[:6].expand(4, 3, 6), x.view(4, 3, 16), w.T.reshape(4, 16, 6)),
}


@pytest.mark.parametrize("name", MATMULS)
def test_bf16_matmuls_equal_torch_bf16_kernels_forward_and_backward(name):
    torch.manual_seed(0)
    inputs = [bf16(12, 16), bf16(24, 16), bf16(24)]
    results = []
    for mode in (Float32MatmulsForBf16(), contextlib.nullcontext()):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with mode:
            out = MATMULS[name](*leaves)
            grads = torch.autograd.grad(out, leaves, grad_outputs=torch.ones_like(out), allow_unused=True)
        results.append([out, *[g for g in grads if g is not None]])
    for widened, native in zip(*results):
        assert widened.dtype == native.dtype == torch.bfloat16
        torch.testing.assert_close(widened, native, rtol=2**-7, atol=1e-2)  # one bf16 rounding apart at most


def test_other_dtypes_and_mixed_operands_pass_through():
    torch.manual_seed(0)
    x, w = torch.randn(5, 8), torch.randn(8, 3)
    plain = x @ w
    with Float32MatmulsForBf16():
        assert torch.equal(x @ w, plain)
        with pytest.raises(RuntimeError, match="dtype"):  # not silently widened
            torch.mm(x.bfloat16(), w)


@pytest.mark.parametrize("native", [False, True])
def test_the_context_is_a_no_op_where_bf16_is_native_or_not_on_the_cpu(native, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    assert isinstance(cpu_bf16_matmuls("cpu"), Float32MatmulsForBf16) != native
    assert not isinstance(cpu_bf16_matmuls("cuda"), Float32MatmulsForBf16)
