"""The fused, chunked lm_head + divergence equals the unfused computation, values and gradients."""

import pytest
import torch

from kd_lightning import losses
from test_losses import CASE_IDS, CASES

TOKENS, STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB = 23, 12, 20, 31


def problem(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    return (
        randn(TOKENS, STUDENT_HIDDEN).requires_grad_(True),
        randn(VOCAB, STUDENT_HIDDEN, scale=0.7).requires_grad_(True),
        randn(TOKENS, TEACHER_HIDDEN),
        randn(VOCAB, TEACHER_HIDDEN, scale=0.7),
    )


def eager_and_fused(divergence, temperature, chunk_size, weights=None, upstream=None, dtype=torch.float64):
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem(dtype)
    upstream = torch.ones(TOKENS, dtype=torch.float64) if upstream is None else upstream
    results = []
    for fused in (False, True):
        if fused:
            values = losses.fused_linear_divergence(
                divergence, student_hidden, student_weight, teacher_hidden, teacher_weight,
                temperature, chunk_size, weights=weights,
            )
        else:
            values = divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, temperature)
            if weights is not None:
                values = torch.where(weights != 0, values, torch.zeros_like(values))
        grads = torch.autograd.grad((values * upstream.to(values.dtype)).sum(), (student_hidden, student_weight))
        results.append((values.detach(), *grads))
    return results


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-tau", "per-token-tau"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_fused_equals_eager(name, params, per_token, chunk_size):
    temperature = torch.linspace(0.5, 3.0, TOKENS, dtype=torch.float64) if per_token else 1.7
    tau_squared = torch.as_tensor(temperature, dtype=torch.float64).expand(TOKENS) ** 2
    (value, *grads), (fused_value, *fused_grads) = eager_and_fused(
        losses.get(name, **params), temperature, chunk_size, weights=tau_squared, upstream=tau_squared / TOKENS
    )
    torch.testing.assert_close(fused_value, value, rtol=1e-9, atol=1e-12)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name, params", CASES[::3], ids=CASE_IDS[::3])
def test_zero_weight_tokens_are_skipped(name, params):
    weights = torch.ones(TOKENS, dtype=torch.float64)
    weights[::3] = 0
    (value, *grads), (fused_value, *fused_grads) = eager_and_fused(losses.get(name, **params), 2.0, 5, weights=weights)
    assert (fused_value[::3] == 0).all()
    torch.testing.assert_close(fused_value, value)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad)


@pytest.mark.parametrize("name", ["fkl", "csd", "akl"])
def test_any_upstream_gradient_is_exact(name):
    """An upstream gradient not proportional to the weights is recomputed, not guessed."""
    upstream = torch.linspace(-1.0, 2.0, TOKENS, dtype=torch.float64)
    (value, *grads), (fused_value, *fused_grads) = eager_and_fused(losses.get(name), 1.3, 4, upstream=upstream)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad)


@pytest.mark.parametrize("name, params", CASES[::2], ids=CASE_IDS[::2])
def test_float32_and_bf16_weights(name, params):
    divergence = losses.get(name, **params)
    (value, *grads), _ = eager_and_fused(divergence, 2.0, 8)
    for dtype, rtol, atol in ((torch.float32, 1e-4, 1e-5), (torch.bfloat16, 0.1, 0.02)):
        _, (fused_value, *fused_grads) = eager_and_fused(divergence, 2.0, 8, dtype=dtype)
        assert fused_value.dtype == torch.float32
        torch.testing.assert_close(fused_value.double(), value, rtol=rtol, atol=atol)
        for fused_grad, grad in zip(fused_grads, grads):
            assert fused_grad.dtype == dtype
            torch.testing.assert_close(fused_grad.double(), grad, rtol=rtol, atol=atol)


def test_cross_entropy_from_the_same_pass():
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    _, cross_entropy = losses.fused_linear_divergence(
        losses.get("fkl"), student_hidden, student_weight, teacher_hidden, teacher_weight, 3.0, 5, labels=labels
    )
    expected = torch.nn.functional.cross_entropy(student_hidden @ student_weight.T, labels, reduction="none")
    torch.testing.assert_close(cross_entropy, expected.detach())


def test_bad_input():
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    fkl = losses.get("fkl")
    with pytest.raises(ValueError, match="31 rows, the teacher's 30"):
        losses.fused_linear_divergence(fkl, student_hidden, student_weight, teacher_hidden, teacher_weight[:30])
    with pytest.raises(ValueError, match="temperature"):
        losses.fused_linear_divergence(fkl, student_hidden, student_weight, teacher_hidden, teacher_weight, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.fused_linear_divergence(fkl, student_hidden, student_weight, teacher_hidden, teacher_weight, 1.0, 0)


@pytest.mark.parametrize("name", ["fkl", "akl"])
def test_compiled_chunks_equal_eager(name):
    divergence = losses.get(name)
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem(torch.float32)
    eager = divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, 2.0)
    eager_grads = torch.autograd.grad(eager.sum(), (student_hidden, student_weight))
    fused = losses.fused_linear_divergence(
        divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, 2.0, 8, compile=True
    )
    fused_grads = torch.autograd.grad(fused.sum(), (student_hidden, student_weight))
    torch.testing.assert_close(fused, eager.detach(), rtol=1e-4, atol=1e-5)
    for fused_grad, grad in zip(fused_grads, eager_grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-5)
