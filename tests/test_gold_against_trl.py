"""``losses.gold`` against TRL's own GOLD loss (``trl.experimental.gold.ULDLoss``, called
directly with the inputs its trainer builds), on the same logits, tokens and byte offsets.

What is compared: TRL's ``ULDLoss(...)(student_logits, teacher_logits, labels, ...)`` with
``use_extended_uld=True``, ``uld_use_hybrid_loss=True`` (GOLD), adaptive weights, the end
markers skipped, equal student and teacher temperature τ, for both merge strategies —
against the mean over each example's groups, then over examples, of ``losses.gold`` on
the logits at the positions TRL's strategy reads, with ``LaterTokens`` of its merge
factors (``later_token_log_probs`` with GOLD's floor 1e-8) and the spelling match. The
groups are ``kd_lightning.alignment.align_spans`` of the same byte spans, less the end
markers' group. Values and gradients with respect to the student's logits.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from kd_lightning.alignment import align_spans
from kd_lightning.losses.gold import gold, spelling_match
from kd_lightning.losses.group_terms import LaterTokens, later_token_log_probs

PROMPT, STUDENT_VOCABULARY, TEACHER_VOCABULARY, SHARED = 3, 11, 13, 7


def vocabularies():
    """Two fake tokenizers (TRL reads only ``get_vocab``): SHARED strings in both, at different ids."""
    shared = [f"w{k}" for k in range(SHARED)]
    student = shared + [f"s{k}" for k in range(STUDENT_VOCABULARY - SHARED)]
    teacher = [f"t{k}" for k in range(TEACHER_VOCABULARY - SHARED)] + shared[::-1]
    tokenizer = lambda pieces: SimpleNamespace(get_vocab=lambda: {piece: index for index, piece in enumerate(pieces)})  # noqa: E731
    return tokenizer(student), tokenizer(teacher)


def random_spans(length, pieces, generator):
    cuts = torch.randperm(length - 1, generator=generator)[: pieces - 1].add(1).sort().values.tolist()
    bounds = [0, *cuts, length]
    return torch.tensor(list(zip(bounds[:-1], bounds[1:])), dtype=torch.long)


def side(spans_per_example, vocabulary, generator):
    """One side's batch as TRL's trainer builds it: prompt tokens, response tokens and EOS
    (vocabulary − 1), labels −100 on the prompt, byte offsets (0, 0) on the prompt and
    (n, n) on EOS; all examples of one length (no padding)."""
    ids, labels, offsets = [], [], []
    for spans in spans_per_example:
        sequence = torch.randint(vocabulary - 1, (PROMPT + len(spans),), generator=generator).tolist() + [vocabulary - 1]
        ids.append(sequence)
        labels.append([-100] * PROMPT + sequence[PROMPT:])
        end = int(spans[-1, 1])
        offsets.append([[0, 0]] * PROMPT + spans.tolist() + [[end, end]])
    logits = 2.0 * torch.randn(len(ids), len(ids[0]), vocabulary, generator=generator, dtype=torch.float64)
    return logits, torch.tensor(ids), torch.tensor(labels), torch.tensor(offsets)


def gathered(logits, ids, starts, sizes, strategy, tau):
    """One example's base logits per group and its merge factors' log-probabilities, as
    TRL's strategy reads them: ``observed`` the position holding the group's first token and
    each later position's probability of its own input token; ``bayesian`` the position
    predicting the group's last token and the chain-rule probabilities of its earlier ones."""
    base, rows, tokens, groups = [], [], [], []
    for group, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist())):
        members = [PROMPT + start + k for k in range(size)]  # sequence indices of the group's tokens
        if strategy == "observed":
            base.append(members[0])
            factors = [(index, index) for index in members[1:]]
        else:
            base.append(members[-1] - 1)
            factors = [(index - 1, index) for index in members[:-1]]
        for row, token in factors:
            rows.append(row), tokens.append(int(ids[token])), groups.append(group)
    later = later_token_log_probs(
        logits[rows], torch.tensor(tokens, dtype=torch.long), torch.tensor(groups, dtype=torch.long), len(starts), tau,
        floor=math.log(1e-8),
    )
    return logits[base], later


@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_gold_equals_trl_gold_loss(strategy, beta):
    gold_trainer = pytest.importorskip("trl.experimental.gold.gold_trainer")
    generator = torch.Generator().manual_seed(7)
    student_spans = [random_spans(24, 9, generator), random_spans(24, 9, generator)]
    teacher_spans = [random_spans(24, 7, generator), random_spans(24, 7, generator)]
    student_tokenizer, teacher_tokenizer = vocabularies()
    student_logits, student_ids, student_labels, student_offsets = side(student_spans, STUDENT_VOCABULARY, generator)
    teacher_logits, teacher_ids, teacher_labels, teacher_offsets = side(teacher_spans, TEACHER_VOCABULARY, generator)
    student_logits.requires_grad_(True)
    tau = 1.7
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=tau,
        uld_teacher_temperature=tau, uld_skip_student_eos=True, uld_skip_teacher_eos=True, use_extended_uld=True,
        uld_token_merge_strategy=strategy, uld_use_hybrid_loss=True, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=beta,
    )
    trl_loss = gold_trainer.ULDLoss(config, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)(
        student_logits, teacher_logits, student_labels, teacher_labels, student_ids, teacher_ids,
        student_byte_offsets=student_offsets, teacher_byte_offsets=teacher_offsets,
    )
    match = spelling_match(teacher_tokenizer, student_tokenizer)
    per_example = []
    for example in range(2):
        alignment = align_spans(student_spans[example], teacher_spans[example])
        count = len(alignment) - 1  # the end markers' group: TRL skips EOS
        student_base, student_later = gathered(
            student_logits[example], student_ids[example], alignment.student_starts[:count], alignment.student_sizes[:count], strategy, tau
        )
        teacher_base, teacher_later = gathered(
            teacher_logits[example], teacher_ids[example], alignment.teacher_starts[:count], alignment.teacher_sizes[:count], strategy, tau
        )
        later = LaterTokens(student_later, teacher_later)
        per_example.append(gold(student_base, teacher_base, match, tau, beta, later=later).mean())
    ours = torch.stack(per_example).mean()
    (trl_gradient,) = torch.autograd.grad(trl_loss, student_logits)
    (our_gradient,) = torch.autograd.grad(ours, student_logits)
    assert abs(ours.item() - trl_loss.item()) < 1e-5 * max(1.0, abs(trl_loss.item()))
    torch.testing.assert_close(our_gradient, trl_gradient, rtol=1e-5, atol=1e-8)
