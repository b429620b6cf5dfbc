"""lm_head and divergence fused, chunk by chunk over tokens: never the full logits.

For each chunk of tokens the student's and the teacher's logits are computed, then the
divergence and its analytic gradient in logit space (``Divergence.values_and_logit_gradients``, plus
the cross-entropy's ``softmax(z) − onehot(label)`` when it is weighted in), and
that gradient goes straight through the student's lm_head into float32 accumulators
for the hidden states and the weight. The chunk's logits are then dropped: memory holds
one chunk of logits, whatever the number of tokens. One chunk iterator (``chunks``)
serves the gradient pass and the statistics pass (``token_statistics``).

The result equals the unfused computation within float32 tolerance; bf16 weights run
their matmuls in bf16 and everything else in float32 (float64 for float64 weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from kd_lightning.losses.base import Divergence, check_temperature, compute_dtype, hellinger
from kd_lightning.losses.targets import LinearTargets, TopKTargets, check_top_k_divergence

Targets = LinearTargets | TopKTargets


def chunks(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Targets,
    visited: Tensor,
    chunk_size: int,
    inverse_temperature: Tensor | None = None,
    temper_student: bool = True,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The one chunk loop of the fused path: for each ``chunk_size`` of the ``visited``
    tokens (``[N]`` bool), their indices, the student's hidden states, its logits ``[n, V]``
    and the teacher's side from ``targets`` (logits ``[n, V]``, or top-K log-probabilities).

    With ``inverse_temperature`` (``[N]``, 1/τ) both sides are tempered; the student's as
    ``z/τ = (h/τ) Wᵀ``, so the temperature costs no pass over the vocabulary. With
    ``temper_student=False`` the student's stay untempered (z, for the cross-entropy).
    """
    for rows in visited.nonzero().squeeze(-1).split(chunk_size):
        hidden = student_rows = student_hidden[rows]
        if inverse_temperature is not None and temper_student:
            student_rows = hidden * inverse_temperature[rows].unsqueeze(-1).to(hidden.dtype)
        yield rows, hidden, student_rows @ student_weight.T, targets.tempered_logits(rows, inverse_temperature)


def chunked_pass(
    divergence: Divergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Targets,
    temperature: Tensor,
    weights: Tensor,
    chunk_size: int,
    with_gradients: bool = True,
    labels: Tensor | None = None,
    compile: bool = False,
    ce_weights: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """D per token, the student's cross-entropy on ``labels`` at τ = 1 (zeros without
    labels), and the gradients of ``Σ_i weights_i · D_i + Σ_i ce_weights_i · CE_i`` with
    respect to the student's hidden states and lm_head weight. Tokens whose weight and
    ce weight are both 0 are skipped entirely: their D and cross-entropy are 0.
    ``matmul_dtype`` runs the matmuls in that dtype (copies of the weights, once per
    pass), everything else in the weights' compute dtype."""
    step, ce_step = chunk_steps(divergence, compile)
    dtype = compute_dtype(student_weight, targets)
    if matmul_dtype is not None:
        student_hidden, student_weight = student_hidden.to(matmul_dtype), student_weight.to(matmul_dtype)
        targets = targets.for_matmuls(matmul_dtype)
    values = torch.zeros(len(student_hidden), dtype=dtype, device=student_hidden.device)
    cross_entropy = torch.zeros_like(values)
    hidden_grad = torch.zeros_like(student_hidden, dtype=dtype) if with_gradients else None
    weight_grad = torch.zeros_like(student_weight, dtype=dtype) if with_gradients else None
    visited = weights != 0 if ce_weights is None else (weights != 0) | (ce_weights != 0)
    inverse_temperature = 1 / temperature
    inputs = (student_hidden, student_weight, targets, visited, chunk_size, inverse_temperature)
    for rows, hidden, student_logits, teacher_logits in chunks(*inputs, temper_student=labels is None):
        ce_grad = None
        student_logits = student_logits.to(dtype)
        if labels is not None:  # the cross-entropy at τ = 1 first, then z/τ
            ce_scale = ce_weights[rows] if with_gradients and ce_weights is not None else None
            cross_entropy[rows], ce_grad = ce_step(student_logits, labels[rows], ce_scale)
            student_logits = student_logits * inverse_temperature[rows].unsqueeze(-1)
        gradient_scale = weights[rows] / temperature[rows] if with_gradients else None
        values[rows], logit_grad = divergence_step(step, targets, rows, student_logits, teacher_logits.to(dtype), gradient_scale)
        del student_logits, teacher_logits
        if with_gradients:
            if ce_grad is not None:  # the cross-entropy's logit gradient joins in the same chunk
                logit_grad += ce_grad
                del ce_grad
            accumulate_gradients(logit_grad.to(student_weight.dtype), rows, hidden, student_weight, hidden_grad, weight_grad)
    return values, cross_entropy, hidden_grad, weight_grad


def divergence_step(
    step: Callable, targets: Targets, rows: Tensor, student_logits: Tensor, teacher_logits: Tensor, gradient_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``step`` on the outcomes ``targets`` compares (the vocabulary, or the top-K ids and the
    rest), its gradient returned to the student's vocabulary."""
    values, outcome_gradient = step(targets.student_outcomes(student_logits, rows), teacher_logits, gradient_scale)
    if outcome_gradient is None:
        return values, None
    return values, targets.vocabulary_gradient(outcome_gradient, student_logits, rows)


def accumulate_gradients(
    logit_grad: Tensor, rows: Tensor, hidden: Tensor, student_weight: Tensor, hidden_grad: Tensor, weight_grad: Tensor
) -> None:
    """Through the student's lm_head ``z = h Wᵀ``: ``∂/∂h = g W`` into ``hidden_grad[rows]``
    and ``∂/∂W += gᵀ h`` into ``weight_grad``, for one chunk's logit gradient g."""
    hidden_grad[rows] = (logit_grad @ student_weight).to(hidden_grad.dtype)
    if weight_grad.dtype == logit_grad.dtype:  # accumulate in place: no V×H temporary per chunk
        weight_grad.addmm_(logit_grad.T, hidden)
    else:
        weight_grad += (logit_grad.T @ hidden).to(weight_grad.dtype)


def chunk_steps(divergence: Divergence, compile: bool) -> tuple[Callable, Callable]:
    """The elementwise work of a chunk: ``chunk_step`` for ``divergence`` and
    ``cross_entropy_step``, compiled by torch.compile if ``compile``."""
    if compile:
        return compiled_chunk_step(divergence), compiled_cross_entropy_step()
    return functools.partial(chunk_step, divergence), cross_entropy_step


def chunk_step(
    divergence: Divergence, student_logits: Tensor, teacher_logits: Tensor, gradient_scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """From one chunk's tempered logits: D per token and, if ``gradient_scale`` is given,
    ``gradient_scale_i · ∂D_i/∂(z/τ)`` — every pass over the vocabulary of the fused path."""
    student_log_probs = torch.log_softmax(student_logits, -1)
    teacher_log_probs = torch.log_softmax(teacher_logits, -1)
    if gradient_scale is None:
        return divergence.values(student_log_probs, teacher_log_probs), None
    values, gradient = divergence.values_and_logit_gradients(student_log_probs, teacher_log_probs)
    return values, gradient * gradient_scale.unsqueeze(-1)


@functools.cache
def compiled_chunk_step(divergence: Divergence):
    """``chunk_step`` for ``divergence``, compiled by torch.compile: its passes over the
    vocabulary fuse into a few loops (the first call compiles, for seconds to a minute)."""
    return torch.compile(functools.partial(chunk_step, divergence), dynamic=True)


def cross_entropy_per_token(logits: Tensor, labels: Tensor) -> Tensor:
    """``logsumexp(z) − z[label]`` per token, in float32 at least."""
    return cross_entropy_step(logits.to(compute_dtype(logits)), labels, None)[0]


def cross_entropy_step(logits: Tensor, labels: Tensor, gradient_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """From one chunk's logits ``z`` (τ = 1): ``CE = logsumexp(z) − z[label]`` per token and,
    if ``gradient_scale`` is given, ``gradient_scale_i · ∂CE_i/∂z = gradient_scale_i ·
    (softmax(z) − onehot(label))``."""
    log_normalizer = torch.logsumexp(logits, -1, keepdim=True)
    label_logits = logits.gather(-1, labels.unsqueeze(-1))
    cross_entropy = (log_normalizer - label_logits).squeeze(-1)
    if gradient_scale is None:
        return cross_entropy, None
    scale = gradient_scale.unsqueeze(-1)
    gradient = torch.exp(logits - log_normalizer) * scale
    return cross_entropy, gradient.scatter_add(-1, labels.unsqueeze(-1), -scale)


@functools.cache
def compiled_cross_entropy_step():
    """``cross_entropy_step`` compiled by torch.compile (see ``compiled_chunk_step``)."""
    return torch.compile(cross_entropy_step, dynamic=True)


@torch.no_grad()
def token_statistics(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Targets,
    labels: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per token at τ = 1, chunk by chunk and without gradient: the Hellinger distance
    between teacher and student on the outcomes ``targets`` compares (a token's
    difficulty) and the student's cross-entropy."""
    difficulty = torch.zeros(len(student_hidden), device=student_hidden.device)
    cross_entropy = torch.zeros_like(difficulty)
    every_token = torch.ones(len(student_hidden), dtype=torch.bool, device=student_hidden.device)
    for rows, _, student_logits, teacher_logits in chunks(student_hidden, student_weight, targets, every_token, chunk_size):
        difficulty[rows] = hellinger(targets.student_outcomes(student_logits, rows), teacher_logits).float()
        cross_entropy[rows] = cross_entropy_per_token(student_logits, labels[rows]).float()
    return difficulty, cross_entropy


def upstream_scale(foreseen: Tensor, received: Tensor) -> Tensor | None:
    """The constant c with ``received = c · foreseen`` (to a relative 1e-6), or ``None`` when
    the upstream gradient ``received`` is not proportional to the ``foreseen`` weights: then
    gradients computed in a forward pass at those weights are ``c`` times the right ones."""
    weighted = foreseen != 0
    scale = received[weighted][:1] / foreseen[weighted][:1] if weighted.any() else received.new_zeros(1)
    return scale if torch.allclose(received, scale * foreseen, rtol=1e-6, atol=0) else None


class _FusedDivergence(torch.autograd.Function):
    """Gradients are computed in the forward pass for upstream gradients proportional to
    ``(weights, ce_weights)`` (what a weighted mean of D and cross-entropy gives) and
    scaled in backward; any other upstream gradient is served exactly by a second
    chunked pass."""

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, targets, divergence, temperature, weights, chunk_size, labels, compile,
        ce_weights, matmul_dtype,
    ):
        inputs = (divergence, student_hidden, student_weight, targets, temperature)
        needs_gradients = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        values, cross_entropy, hidden_grad, weight_grad = chunked_pass(
            *inputs, weights, chunk_size, needs_gradients, labels, compile, ce_weights, matmul_dtype
        )
        ctx.inputs, ctx.chunk_size, ctx.labels, ctx.compile = inputs, chunk_size, labels, compile
        ctx.matmul_dtype = matmul_dtype
        ctx.weights, ctx.ce_weights = weights, ce_weights
        ctx.hidden_grad, ctx.weight_grad = hidden_grad, weight_grad
        if ce_weights is None:
            ctx.mark_non_differentiable(cross_entropy)
        return values, cross_entropy

    @staticmethod
    def backward(ctx, upstream, cross_entropy_upstream):
        weights, ce_weights, (_, student_hidden, student_weight, *_) = ctx.weights, ctx.ce_weights, ctx.inputs
        if ce_weights is None:  # the cross-entropy is then not differentiable: no upstream to match
            ce_weights = cross_entropy_upstream = torch.zeros_like(weights)
        visited = (weights != 0) | (ce_weights != 0)
        scale = upstream_scale(torch.cat([weights, ce_weights]), torch.cat([upstream, cross_entropy_upstream]))
        if scale is not None:
            hidden_grad, weight_grad = ctx.hidden_grad * scale, ctx.weight_grad * scale
        else:  # upstream gradients the forward pass could not foresee: recompute
            exact_weights, exact_ce_weights = (
                torch.where(visited, gradient.to(weights.dtype), torch.zeros_like(weights))
                for gradient in (upstream, cross_entropy_upstream)
            )
            with_cross_entropy = ctx.ce_weights is not None
            _, _, hidden_grad, weight_grad = chunked_pass(
                *ctx.inputs, exact_weights, ctx.chunk_size, compile=ctx.compile,
                labels=ctx.labels if with_cross_entropy else None,
                ce_weights=exact_ce_weights if with_cross_entropy else None, matmul_dtype=ctx.matmul_dtype,
            )
        ctx.hidden_grad = ctx.weight_grad = None
        return (
            hidden_grad.to(student_hidden.dtype) if ctx.needs_input_grad[0] else None,
            weight_grad.to(student_weight.dtype) if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None, None, None,
        )


def check_fused_inputs(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Targets,
    temperature: float | Tensor,
    chunk_size: int,
    labels: Tensor | None,
    ce_weights: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the first input of ``fused_divergence`` that does not fit."""
    vocab = student_weight.shape[0]
    if targets.vocab_size != vocab:
        raise ValueError(
            f"vocabulary sizes differ: the student lm_head has {vocab} rows, the teacher's "
            f"{targets.vocab_size}; slice both to the shared tokenizer size"
        )
    if len(targets) != len(student_hidden):
        raise ValueError(f"student and teacher must cover the same tokens: {len(student_hidden)} vs {len(targets)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if ce_weights is not None and labels is None:
        raise ValueError("ce_weights weigh the cross-entropy on labels: pass labels too")
    check_temperature(temperature)


def fused_divergence(
    divergence: Divergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Targets,
    temperature: float | Tensor = 1.0,
    chunk_size: int = 1024,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    compile: bool = False,
    ce_weights: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """D between ``targets`` and ``student_hidden @ student_weight.T`` per token, ``[N]``
    float32, computed ``chunk_size`` tokens at a time. Args:
        student_hidden: ``[N, Hs]``; student_weight: ``[V, Hs]`` (the lm_head weight).
        targets: ``LinearTargets`` (the teacher's hidden states and lm_head weight: D over
            the vocabulary) or ``TopKTargets`` (its top-K log-probabilities: D over K + 1
            outcomes); no gradient. temperature: a float or ``[N]``.
        weights: ``[N]``, optional: the weights the caller will apply to D (e.g. τ²) —
            the gradients are then ready after the forward pass. Tokens of zero weight
            (and zero ce weight) are skipped entirely (D = 0, no gradient).
        labels: ``[N]``, optional: then the student's cross-entropy on them at τ = 1 comes
            back too, as ``(D, cross_entropy)``, from the same pass (without gradient
            unless ``ce_weights`` is given).
        compile: fuse each chunk's passes over the vocabulary with ``torch.compile`` (faster; the first call compiles).
        ce_weights: ``[N]``, optional, with ``labels``: the weights the caller will apply to
            the cross-entropy, then differentiable; its logit gradient joins the divergence's
            in the same chunk. Tokens of zero weight but nonzero ce weight get their D too.
        matmul_dtype: e.g. ``torch.bfloat16``: the logit and gradient matmuls in that
            dtype (fast on CPUs with bf16 matrix units and on GPUs), with float32
            accumulators and float32 elementwise work; gradients keep the inputs' dtypes.

    Differentiable with respect to ``student_hidden`` and ``student_weight`` (see above).
    """
    check_fused_inputs(student_hidden, student_weight, targets, temperature, chunk_size, labels, ce_weights)
    if isinstance(targets, TopKTargets):
        check_top_k_divergence(divergence)
    tokens, device = len(student_hidden), student_hidden.device
    dtype = compute_dtype(student_weight, targets)
    temperature = torch.as_tensor(temperature, dtype=dtype, device=device).expand(tokens).contiguous()
    weights = torch.ones(tokens, dtype=dtype, device=device) if weights is None else weights.detach().to(dtype)
    if ce_weights is not None:
        ce_weights = ce_weights.detach().to(dtype).expand(tokens).contiguous()
    values, cross_entropy = _FusedDivergence.apply(
        student_hidden, student_weight, targets.detach(), divergence, temperature, weights, chunk_size, labels, compile,
        ce_weights, matmul_dtype,
    )
    return values if labels is None else (values, cross_entropy)


def fused_linear_divergence(
    divergence: Divergence,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *args,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """``divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, τ)``
    per token, chunk by chunk, never holding more than ``chunk_size × V`` logits: the
    ``fused_divergence`` of ``LinearTargets(teacher_hidden, teacher_weight)``, with the same
    further arguments (temperature, chunk_size, weights, labels, compile, ce_weights, matmul_dtype)."""
    return fused_divergence(divergence, student_hidden, student_weight, LinearTargets(teacher_hidden, teacher_weight), *args, **kwargs)
