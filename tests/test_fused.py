"""The fused, chunked lm_head + divergence equals the unfused computation, values and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("name", ["fkl", "jsd", "csd"])
def test_bf16_matmuls_of_float32_weights(name):
    """``matmul_dtype=bfloat16``: float32 in and out, within bf16 rounding of the float64
    reference, and equal to the fused pass on bf16 copies of the inputs."""
    divergence = losses.get(name)
    (value, *grads), _ = eager_and_fused(divergence, 2.0, 8)
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem(torch.float32)
    fused = losses.fused_linear_divergence(
        divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, 2.0, 8, matmul_dtype=torch.bfloat16
    )
    fused_grads = torch.autograd.grad(fused.sum(), (student_hidden, student_weight))
    bf16_inputs = [tensor.detach().bfloat16().requires_grad_(tensor.requires_grad) for tensor in problem(torch.float32)]
    bf16 = losses.fused_linear_divergence(divergence, *bf16_inputs, 2.0, 8)
    bf16_grads = torch.autograd.grad(bf16.sum(), bf16_inputs[:2])
    torch.testing.assert_close(fused, bf16)
    torch.testing.assert_close(fused.double(), value, rtol=0.1, atol=0.02)
    for fused_grad, bf16_grad, grad in zip(fused_grads, bf16_grads, grads):
        assert fused_grad.dtype == torch.float32
        torch.testing.assert_close(fused_grad, bf16_grad.float(), rtol=0.02, atol=1e-3)
        torch.testing.assert_close(fused_grad.double(), grad, rtol=0.1, atol=0.02)


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


def weighted_loss_and_gradients(divergence, temperature, chunk_size, weights, ce_weights, upstreams=None, fused=True):
    """``Σ weights·D + Σ ce_weights·CE`` (or ``Σ upstreams·(D, CE)``), its parts and its
    gradients, fused or from the full float64 logits."""
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    if fused:
        values, cross_entropy = losses.fused_linear_divergence(
            divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, chunk_size,
            weights=weights, labels=labels, ce_weights=ce_weights,
        )
    else:
        student_logits = student_hidden @ student_weight.T
        values = divergence(student_logits, teacher_hidden @ teacher_weight.T, temperature)
        cross_entropy = torch.nn.functional.cross_entropy(student_logits, labels, reduction="none")
    upstreams = (weights, ce_weights) if upstreams is None else upstreams
    loss = (upstreams[0] * values).sum() + (upstreams[1] * cross_entropy).sum()
    return loss.detach(), cross_entropy.detach(), *torch.autograd.grad(loss, (student_hidden, student_weight))


@pytest.mark.parametrize("name, params", CASES[::3], ids=CASE_IDS[::3])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_cross_entropy_gradient_in_the_fused_pass(name, params, chunk_size):
    """The cross-entropy's logit gradient joins the divergence's chunk by chunk: the mixed
    loss, its parts and its gradients equal the float64 full-logit reference; tokens
    weighted for the cross-entropy only still count for it."""
    divergence = losses.get(name, **params)
    temperature = torch.linspace(0.5, 3.0, TOKENS, dtype=torch.float64)
    weights = 0.7 * temperature**2 / TOKENS
    weights[::4] = 0  # e.g. not kept by a token policy: cross-entropy only
    ce_weights = torch.full((TOKENS,), 0.3 / TOKENS, dtype=torch.float64)
    expected = weighted_loss_and_gradients(divergence, temperature, chunk_size, weights, ce_weights, fused=False)
    fused = weighted_loss_and_gradients(divergence, temperature, chunk_size, weights, ce_weights)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_compiled_cross_entropy_gradient_equals_eager():
    divergence = losses.get("fkl")
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem(torch.float32)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    student_logits = student_hidden @ student_weight.T
    eager = divergence(student_logits, teacher_hidden @ teacher_weight.T, 2.0).sum() + 0.5 * torch.nn.functional.cross_entropy(
        student_logits, labels, reduction="sum"
    )
    values, cross_entropy = losses.fused_linear_divergence(
        divergence, student_hidden, student_weight, teacher_hidden, teacher_weight, 2.0, 8,
        labels=labels, ce_weights=torch.full((TOKENS,), 0.5), compile=True,
    )
    fused = values.sum() + 0.5 * cross_entropy.sum()
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    eager_grads = torch.autograd.grad(eager, (student_hidden, student_weight))
    for fused_grad, grad in zip(torch.autograd.grad(fused, (student_hidden, student_weight)), eager_grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-5)


def test_cross_entropy_with_any_upstream_gradient_is_exact():
    """Upstream gradients not proportional to (weights, ce_weights) are recomputed."""
    weights, ce_weights = torch.ones(TOKENS, dtype=torch.float64), torch.full((TOKENS,), 0.5, dtype=torch.float64)
    upstreams = (torch.linspace(-1.0, 2.0, TOKENS, dtype=torch.float64), torch.linspace(1.0, 0.0, TOKENS, dtype=torch.float64))
    args = (losses.get("jsd"), 1.3, 4, weights, ce_weights, upstreams)
    for got, want in zip(weighted_loss_and_gradients(*args), weighted_loss_and_gradients(*args, fused=False)):
        torch.testing.assert_close(got, want)


def test_ce_weights_need_labels():
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    with pytest.raises(ValueError, match="pass labels"):
        losses.fused_linear_divergence(
            losses.get("fkl"), student_hidden, student_weight, teacher_hidden, teacher_weight,
            ce_weights=torch.ones(TOKENS, dtype=torch.float64),
        )


class LogitRows(TorchDispatchMode):
    """Records, for every new tensor (not a view) an operation makes with a dimension of
    size ``vocab``, how many rows of ``vocab`` entries it holds (``numel / vocab``): full
    logits of N tokens hold N rows, a chunk's at most ``chunk_size``, a ``[V, H]`` weight H."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in [] if func.is_view else torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and self.vocab in tensor.shape:
                self.rows.append(tensor.numel() // self.vocab)
        return out


def test_mixed_loss_builds_no_full_vocabulary_logits():
    """Forward and backward of the fused KD + cross-entropy loss over 300 tokens make no
    tensor with more than ``chunk_size`` (16) rows of the vocabulary, beyond the lm_head
    weights' 20; the same detector sees the 300 rows of the unfused computation."""
    tokens, vocab, chunk_size = 300, 31, 16
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, STUDENT_HIDDEN, generator=generator, requires_grad=True)
    student_weight = torch.randn(vocab, STUDENT_HIDDEN, generator=generator, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(tokens, TEACHER_HIDDEN), torch.randn(vocab, TEACHER_HIDDEN)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    for fused in (True, False):
        with LogitRows(vocab) as recorder:
            if fused:
                values, cross_entropy = losses.fused_linear_divergence(
                    losses.get("fkl"), student_hidden, student_weight, teacher_hidden, teacher_weight, 2.0,
                    chunk_size, labels=labels, ce_weights=torch.full((tokens,), 0.5),
                )
            else:
                student_logits = student_hidden @ student_weight.T
                values = losses.get("fkl")(student_logits, teacher_hidden @ teacher_weight.T, 2.0)
                cross_entropy = torch.nn.functional.cross_entropy(student_logits, labels, reduction="none")
            (values.sum() + 0.5 * cross_entropy.sum()).backward()
        assert max(recorder.rows) <= max(chunk_size, TEACHER_HIDDEN) if fused else max(recorder.rows) == tokens


def test_one_chunk_iterator_visits_each_selected_token_once():
    from kd_lightning.losses.fused import chunks

    student_hidden, student_weight, teacher_hidden, teacher_weight = (tensor.detach() for tensor in problem())
    visited = torch.arange(TOKENS) % 3 != 0
    inverse_tau = torch.linspace(0.5, 2.0, TOKENS, dtype=torch.float64)
    seen = []
    targets = losses.LinearTargets(teacher_hidden, teacher_weight)
    for rows, hidden, student_logits, teacher_logits in chunks(student_hidden, student_weight, targets, visited, 4, inverse_tau):
        assert len(rows) <= 4
        seen += rows.tolist()
        torch.testing.assert_close(hidden, student_hidden[rows])
        torch.testing.assert_close(student_logits, (student_hidden[rows] @ student_weight.T) * inverse_tau[rows, None])
        torch.testing.assert_close(teacher_logits, (teacher_hidden[rows] @ teacher_weight.T) * inverse_tau[rows, None])
    assert seen == visited.nonzero().squeeze(-1).tolist()


def test_token_statistics_equal_the_unfused_ones():
    """The statistics pass (difficulty and cross-entropy at τ = 1, no gradient) runs through
    the same chunks as the gradient pass and equals the full-logit computation."""
    from kd_lightning.losses.fused import cross_entropy_per_token, token_statistics

    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    labels = torch.arange(TOKENS) % VOCAB
    targets = losses.LinearTargets(teacher_hidden, teacher_weight)
    difficulty, cross_entropy = token_statistics(student_hidden, student_weight, targets, labels, 5)
    student_logits, teacher_logits = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    torch.testing.assert_close(difficulty, losses.hellinger(student_logits, teacher_logits).float())
    torch.testing.assert_close(cross_entropy, cross_entropy_per_token(student_logits.detach(), labels).float())
    assert not difficulty.requires_grad and not cross_entropy.requires_grad
