"""Top-k teacher outputs: the divergence on K + 1 outcomes, against float64 references and the exact loss."""

import math

import pytest
import torch

from kd_lightning import losses
from kd_lightning.topk_cache import id_bits, pack_ids, top_log_probs, unpack_ids
from test_fused import TOKENS, VOCAB, problem
from test_losses import CASE_IDS, CASES

#: CSD's uniform weighting needs the whole vocabulary: refused with top-k targets (tested below)
TOPK_CASES = [(case, case_id) for case, case_id in zip(CASES, CASE_IDS) if case[1].get("weighting") != "us"]


def targets_of(teacher_hidden, teacher_weight, top_k):
    """The top-k targets of the teacher's logits, as the cache writer computes them."""
    log_probs, ids, tail = top_log_probs(teacher_hidden @ teacher_weight.T, top_k)
    dtype = teacher_hidden.dtype  # the references run in float64
    exact = torch.log_softmax((teacher_hidden @ teacher_weight.T).to(dtype), -1)
    return losses.TopKTargets(exact.gather(-1, ids), ids, torch.logsumexp(exact.scatter(-1, ids, -torch.inf), -1), VOCAB)


def reference_topk_divergence(divergence, student_logits, targets, temperature):
    """The K + 1 outcome loss written plainly, for autograd: q̃ = (q[ids], 1 − Σ q[ids]) at τ;
    p̃ ∝ (p[ids]^{1/τ}, (V − K)·(m / (V − K))^{1/τ}) with m the tail mass."""
    tau = torch.as_tensor(temperature, dtype=student_logits.dtype).expand(len(student_logits)).unsqueeze(-1)
    student_probs = torch.softmax(student_logits / tau, -1)
    top_q = student_probs.gather(-1, targets.ids)
    student = torch.cat([top_q, 1 - top_q.sum(-1, keepdim=True)], -1)
    rest_ids = VOCAB - targets.ids.shape[-1]
    top_p = targets.log_probs.exp() ** (1 / tau)
    rest_p = rest_ids * (targets.tail_log_mass.exp().unsqueeze(-1) / rest_ids) ** (1 / tau)
    teacher = torch.cat([top_p, rest_p], -1)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    return divergence.values(student.log(), teacher.log())


@pytest.mark.parametrize("case", [case for case, _ in TOPK_CASES], ids=[case_id for _, case_id in TOPK_CASES])
@pytest.mark.parametrize("top_k", [1, 5, VOCAB])
def test_topk_fused_equals_the_reference_and_at_k_equal_v_the_exact_loss(case, top_k):
    """Values and gradients of the fused top-k loss equal a float64 autograd reference at
    per-token τ; with K = V they equal the full-vocabulary loss itself."""
    name, params = case
    divergence = losses.get(name, **params)
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    targets = targets_of(teacher_hidden, teacher_weight, top_k)
    temperature = torch.linspace(0.5, 3.0, TOKENS, dtype=torch.float64)
    fused = losses.fused_divergence(divergence, student_hidden, student_weight, targets, temperature, 7)
    fused_grads = torch.autograd.grad(fused.sum(), (student_hidden, student_weight))
    if top_k == VOCAB:
        reference = divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, temperature)
    else:
        reference = reference_topk_divergence(divergence, student_hidden @ student_weight.T, targets, temperature)
    grads = torch.autograd.grad(reference.sum(), (student_hidden, student_weight))
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-9)
    for fused_grad, grad in zip(fused_grads, grads):
        torch.testing.assert_close(fused_grad, grad, rtol=1e-6, atol=1e-9)


def test_at_tau_1_the_teacher_side_is_exact_and_sums_to_one():
    _, _, teacher_hidden, teacher_weight = problem()
    targets = targets_of(teacher_hidden, teacher_weight, 4)
    rows = torch.arange(TOKENS)
    teacher = targets.tempered_logits(rows, None)
    exact = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    torch.testing.assert_close(teacher[:, :4], exact.gather(-1, targets.ids))
    torch.testing.assert_close(teacher[:, 4].exp(), 1 - exact.gather(-1, targets.ids).exp().sum(-1))
    hotter = targets.tempered_logits(rows, torch.full((TOKENS,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(hotter.exp().sum(-1), torch.ones(TOKENS, dtype=torch.float64))


def test_the_tail_retempering_bounds_the_true_tail_share():
    """Spreading the tail evenly over-estimates its share at τ > 1 and under-estimates it at τ < 1."""
    _, _, teacher_hidden, teacher_weight = problem()
    targets = targets_of(teacher_hidden, teacher_weight, 4)
    rows = torch.arange(TOKENS)
    for tau, sign in ((2.0, 1), (0.5, -1)):
        approximate = targets.tempered_logits(rows, torch.full((TOKENS,), 1 / tau, dtype=torch.float64))[:, -1].exp()
        true = torch.softmax((teacher_hidden @ teacher_weight.T) / tau, -1).scatter(-1, targets.ids, 0).sum(-1)
        assert (sign * (approximate - true) >= -1e-12).all()


@pytest.mark.parametrize("vocab_size", [2, 31, 49_152, 151_936, 262_144])
def test_ids_pack_to_the_bits_the_vocabulary_needs_and_back(vocab_size):
    bits = id_bits(vocab_size)
    assert bits == math.ceil(math.log2(vocab_size))
    ids = torch.randint(0, vocab_size, (9, 11), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = vocab_size - 1
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (9, math.ceil(11 * bits / 8))
    assert torch.equal(unpack_ids(packed, 11, bits), ids)


def test_csd_with_uniform_weighting_is_refused_with_topk_targets():
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    targets = targets_of(teacher_hidden, teacher_weight, 4)
    with pytest.raises(ValueError, match="divergence.weighting=us .*K \\+ 1 outcomes"):
        losses.fused_divergence(losses.get("csd", weighting="us"), student_hidden, student_weight, targets)


def test_topk_targets_of_another_vocabulary_are_refused():
    student_hidden, student_weight, teacher_hidden, teacher_weight = problem()
    targets = targets_of(teacher_hidden, teacher_weight, 4)
    targets.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match=f"student lm_head has {VOCAB} rows, the teacher's {VOCAB + 1}"):
        losses.fused_divergence(losses.get("fkl"), student_hidden, student_weight, targets)
