"""Cross-tokenizer objectives (hybrid, uld, gold) against slow, plain float64 loops over
groups and vocabulary entries, values and gradients; hybrid against the same-tokenizer
divergences with one tokenizer; bad inputs and the registry."""

import math

import pytest
import torch

from kd_lightning import losses
from kd_lightning.losses.cross_tokenizer import available, hybrid, objective, uld
from kd_lightning.losses.gold import gold
from kd_lightning.losses.group_terms import LaterTokens, later_token_log_probs
from kd_lightning.vocabulary import VocabularyMatch
from test_losses import CASE_IDS, CASES

GROUPS = 5


def match_of(pairs, student_vocabulary, teacher_vocabulary):
    teacher_ids, student_ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.contiguous()
    return VocabularyMatch(teacher_ids, student_ids, teacher_vocabulary, student_vocabulary, 0, 0)


def random_match(kind, seed=0):
    """(match, V_s, V_t) of one kind: ``identity`` (one vocabulary, every id matched to
    itself), ``permutation`` (every id of both sides matched, in shuffled pairs: no
    unmatched id), ``partial`` (unmatched ids on both sides), ``teacher_only`` and
    ``student_only`` (only that side has unmatched ids)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"identity": (9, 9), "permutation": (9, 9), "partial": (10, 12), "teacher_only": (8, 11), "student_only": (11, 8)}
    student_vocabulary, teacher_vocabulary = sizes[kind]
    matched = {"identity": 9, "permutation": 9, "partial": 6, "teacher_only": 8, "student_only": 8}[kind]
    if kind == "identity":
        order = torch.randperm(9, generator=generator)  # pair order does not matter
        return match_of([(int(i), int(i)) for i in order], 9, 9), 9, 9
    teacher_ids = torch.randperm(teacher_vocabulary, generator=generator)[:matched]
    student_ids = torch.randperm(student_vocabulary, generator=generator)[:matched]
    return match_of(list(zip(teacher_ids.tolist(), student_ids.tolist())), student_vocabulary, teacher_vocabulary), student_vocabulary, teacher_vocabulary


def group_logits(student_vocabulary, teacher_vocabulary, groups=GROUPS, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = 2.5 * torch.randn(groups, student_vocabulary, generator=generator, dtype=torch.float64)
    teacher = 2.5 * torch.randn(groups, teacher_vocabulary, generator=generator, dtype=torch.float64)
    return student.to(dtype).requires_grad_(True), teacher.to(dtype)


def per_group_temperature(groups=GROUPS):
    return torch.linspace(0.5, 3.0, groups, dtype=torch.float64)


# ---------------------------------------------------------------- plain references
def by_value(entry):
    return float(entry.detach())


def sorted_l1_loop(first, second):
    """Σ_k |a_k − b_k| of two lists of scalar tensors, each sorted descending, zero-padded."""
    first, second = sorted(first, key=by_value, reverse=True), sorted(second, key=by_value, reverse=True)
    zero = torch.zeros((), dtype=torch.float64)
    width = max(len(first), len(second))
    first, second = first + [zero] * (width - len(first)), second + [zero] * (width - len(second))
    return sum(((a - b).abs() for a, b in zip(first, second)), zero)


def reference_hybrid(divergence, student_logits, teacher_logits, match, temperature, unmatched_weight):
    """SPEC §6 read literally, one group and one vocabulary entry at a time:
    p̃ = (p[M_t], 1 − Σ p[M_t]), q̃ = (q[M_s], 1 − Σ q[M_s]), the rest outcome present when
    some id is unmatched (probability exactly 0 on a side without unmatched ids)."""
    pairs = list(zip(match.teacher_ids.tolist(), match.student_ids.tolist()))
    unmatched_teacher = [x for x in range(teacher_logits.shape[-1]) if x not in match.teacher_ids.tolist()]
    unmatched_student = [x for x in range(student_logits.shape[-1]) if x not in match.student_ids.tolist()]
    rows = []
    for g in range(len(student_logits)):
        q = torch.softmax(student_logits[g] / temperature[g], -1)
        p = torch.softmax(teacher_logits[g] / temperature[g], -1)
        teacher_outcomes = [p[t] for t, _ in pairs]
        student_outcomes = [q[s] for _, s in pairs]
        if unmatched_teacher or unmatched_student:
            zero = torch.zeros((), dtype=torch.float64)
            teacher_outcomes.append(1 - sum(teacher_outcomes) if unmatched_teacher else zero)
            student_outcomes.append(1 - sum(student_outcomes) if unmatched_student else zero)
        value = divergence.values(torch.stack(student_outcomes).log()[None], torch.stack(teacher_outcomes).log()[None])[0]
        ulds = sorted_l1_loop([p[x] for x in unmatched_teacher], [q[x] for x in unmatched_student])
        rows.append(value + unmatched_weight * ulds)
    return torch.stack(rows)


def values_and_gradients(function, student_logits):
    values = function(student_logits)
    (gradient,) = torch.autograd.grad(values.sum(), student_logits)
    return values.detach(), gradient


# ---------------------------------------------------------------- hybrid
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_hybrid_with_one_tokenizer_is_the_same_tokenizer_divergence(name, params):
    """Identity match (any pair order), per-group τ, float64: loss and gradient to 1e-6."""
    divergence = losses.get(name, **params)
    match, student_vocabulary, teacher_vocabulary = random_match("identity")
    student_logits, teacher_logits = group_logits(student_vocabulary, teacher_vocabulary)
    tau = per_group_temperature()
    ours = values_and_gradients(lambda z: hybrid(divergence, z, teacher_logits, match, tau), student_logits)
    same = values_and_gradients(lambda z: divergence(z, teacher_logits, tau), student_logits)
    for mine, theirs in zip(ours, same):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


#: every divergence with unmatched ids on both sides; a sample where no id or one side's are unmatched
LOOP_CASES = [(*case, "partial", case_id) for case, case_id in zip(CASES, CASE_IDS)] + [
    (*case, kind, case_id)
    for kind in ("permutation", "teacher_only", "student_only")
    for case, case_id in zip(CASES, CASE_IDS)
    if case_id in ("fkl", "rkl", "jsd", "akl", "abkd", "csd-weighting=us")
]


@pytest.mark.parametrize(
    "name, params, kind", [case[:3] for case in LOOP_CASES], ids=[f"{case_id}-{kind}" for *_, kind, case_id in LOOP_CASES]
)
def test_hybrid_equals_the_plain_loop(name, params, kind):
    """Values and gradients against the loop, unmatched weight 0.7, per-group τ. Where a
    side's rest is empty and D is infinite there (e.g. FKL with a teacher-only rest), both
    are infinite and only the finite groups' gradients are compared."""
    divergence = losses.get(name, **params)
    match, student_vocabulary, teacher_vocabulary = random_match(kind, seed=len(kind))
    student_logits, teacher_logits = group_logits(student_vocabulary, teacher_vocabulary)
    tau = per_group_temperature()
    ours, reference = (
        values_and_gradients(lambda z: function(divergence, z, teacher_logits, match, tau, 0.7).nan_to_num(posinf=0.0), student_logits)
        for function in (hybrid, reference_hybrid)
    )
    finite = torch.isfinite(reference_hybrid(divergence, student_logits, teacher_logits, match, tau, 0.7)).detach()
    assert (torch.isfinite(hybrid(divergence, student_logits, teacher_logits, match, tau, 0.7)) == finite).all()
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours[1][finite], reference[1][finite], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "csd", "akl"])
def test_hybrid_without_a_rest_outcome_has_no_nan_even_from_extreme_float32_logits(name):
    """No unmatched id on either side: no NaN in values or gradients, float32 in and out."""
    divergence = losses.get(name)
    match, student_vocabulary, teacher_vocabulary = random_match("permutation")
    student_logits, teacher_logits = group_logits(student_vocabulary, teacher_vocabulary, dtype=torch.float32)
    student_logits = (student_logits.detach() * 40).requires_grad_(True)
    values, gradient = values_and_gradients(lambda z: hybrid(divergence, z, teacher_logits * 40, match, 0.5), student_logits)
    assert values.dtype == torch.float32 and torch.isfinite(values).all() and torch.isfinite(gradient).all()


def test_hybrid_rest_log_mass_is_exact_where_one_minus_the_sum_rounds_to_zero():
    """A teacher rest of mass ~e^-70: in float32, 1 − Σ p[M] would round to 0 or to noise;
    the logsumexp over the unmatched entries keeps it, so float32 agrees with float64."""
    match, student_vocabulary, teacher_vocabulary = random_match("partial")
    student_logits, teacher_logits = group_logits(student_vocabulary, teacher_vocabulary)
    unmatched = torch.ones(teacher_vocabulary, dtype=torch.bool)
    unmatched[match.teacher_ids] = False
    teacher_logits = teacher_logits.masked_fill(unmatched, -70.0)
    rkl = losses.get("rkl")
    exact = values_and_gradients(lambda z: hybrid(rkl, z, teacher_logits, match, 1.0), student_logits)
    student32 = student_logits.detach().float().requires_grad_(True)
    single = values_and_gradients(lambda z: hybrid(rkl, z, teacher_logits.float(), match, 1.0), student32)
    for low, high in zip(single, exact):
        torch.testing.assert_close(low.double(), high, rtol=1e-4, atol=1e-5)
    assert (exact[0] > 1).all()  # the student's rest mass against e^-70: large, and finite


# ---------------------------------------------------------------- later positions
def group_problem(seed=3):
    """Groups of 1–3 tokens per side: logits at every predicting position, the token each
    predicts, and each position's group (the first position of a group comes first)."""
    generator = torch.Generator().manual_seed(seed)
    student_sizes = torch.tensor([1, 2, 1, 3, 2])
    teacher_sizes = torch.tensor([1, 1, 2, 2, 3])
    sides = []
    for sizes, vocabulary in ((student_sizes, 10), (teacher_sizes, 12)):
        groups = torch.repeat_interleave(torch.arange(GROUPS), sizes)
        logits = 2.0 * torch.randn(len(groups), vocabulary, generator=generator, dtype=torch.float64)
        tokens = torch.randint(vocabulary, (len(groups),), generator=generator)
        first = torch.cumsum(sizes, 0) - sizes
        sides.append((logits, tokens, groups, first, sizes))
    return sides


def later_tokens(student_side, teacher_side, tau, student_logits=None, floor=None):
    """LaterTokens of a group problem, the student's later log-probabilities from ``student_logits``."""
    values = []
    for (logits, tokens, groups, first, _), override in ((student_side, student_logits), (teacher_side, None)):
        logits = logits if override is None else override
        later = torch.ones(len(groups), dtype=torch.bool)
        later[first] = False
        values.append(later_token_log_probs(logits[later], tokens[later], groups[later], GROUPS, tau[groups[later]], floor))
    return LaterTokens(values[0], values[1], student_side[1][student_side[3]], teacher_side[1][teacher_side[3]], student_side[4], teacher_side[4])


def group_probability_loop(divergence, student_logits, student_side, teacher_side, tau):
    """Σ over multi-token groups of D((P_t, 1 − P_t) ‖ (P_s, 1 − P_s)), P by the chain rule, one position at a time."""
    rows = []
    for g in range(GROUPS):
        probabilities = []
        for logits, tokens, groups, _, sizes in ((student_logits, *student_side[1:]), teacher_side):
            probability = torch.ones((), dtype=torch.float64)
            for position in (groups == g).nonzero().squeeze(-1).tolist():
                probability = probability * torch.softmax(logits[position] / tau[g], -1)[tokens[position]]
            probabilities.append(probability)
        several = student_side[4][g] > 1 or teacher_side[4][g] > 1
        student, teacher = (torch.stack([p, 1 - p]).log()[None] for p in probabilities)
        rows.append(divergence.values(student, teacher)[0] if several else torch.zeros((), dtype=torch.float64))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "csd"])
def test_hybrid_group_probability_term_equals_the_chain_rule_loop(name):
    """later_positions="group_probability": hybrid's first-position loss plus the term on
    each multi-token group's probability; gradients reach the student's later positions."""
    divergence = losses.get(name)
    student_side, teacher_side = group_problem()
    match, _, _ = random_match("partial")
    tau = per_group_temperature()
    student_all = student_side[0].clone().requires_grad_(True)

    def ours(logits):
        later = later_tokens(student_side, teacher_side, tau, logits)
        return hybrid(
            divergence, logits[student_side[3]], teacher_side[0][teacher_side[3]], match, tau,
            later_positions="group_probability", later=later, group_probability_weight=0.6,
        )

    def loop(logits):
        first = hybrid(divergence, logits[student_side[3]], teacher_side[0][teacher_side[3]], match, tau)
        return first + 0.6 * group_probability_loop(divergence, logits, student_side, teacher_side, tau)

    mine, reference = values_and_gradients(ours, student_all), values_and_gradients(loop, student_all)
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    later_rows = torch.ones(len(student_all), dtype=torch.bool)
    later_rows[student_side[3]] = False
    assert mine[1][later_rows].abs().sum() > 0


# ---------------------------------------------------------------- uld and gold
def uld_loop(student_logits, teacher_logits, tau, scales=None):
    rows = []
    for g in range(len(student_logits)):
        q = torch.softmax(student_logits[g] / tau[g], -1) * (1 if scales is None else scales[0][g])
        p = torch.softmax(teacher_logits[g] / tau[g], -1) * (1 if scales is None else scales[1][g])
        rows.append(sorted_l1_loop(list(p), list(q)))
    return torch.stack(rows)


@pytest.mark.parametrize("merge", [False, True], ids=["first-position", "merge"])
def test_uld_equals_the_sorted_loop(merge):
    student_side, teacher_side = group_problem()
    tau = per_group_temperature()
    student_all = student_side[0].clone().requires_grad_(True)

    def ours(logits):
        later = later_tokens(student_side, teacher_side, tau, logits) if merge else None
        return uld(logits[student_side[3]], teacher_side[0][teacher_side[3]], tau, "merge" if merge else "none", later)

    def loop(logits):
        later = later_tokens(student_side, teacher_side, tau, logits)
        scales = (later.student_log_probs.exp(), later.teacher_log_probs.exp()) if merge else None
        return uld_loop(logits[student_side[3]], teacher_side[0][teacher_side[3]], tau, scales)

    for a, b in zip(values_and_gradients(ours, student_all), values_and_gradients(loop, student_all)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def gold_loop(student_logits, teacher_logits, match, tau, beta, scales):
    """GOLD per group, entry by entry: clamped JSD_β on matched entries, sorted L1 on unmatched."""
    pairs = list(zip(match.teacher_ids.tolist(), match.student_ids.tolist()))
    unmatched_teacher = [x for x in range(teacher_logits.shape[-1]) if x not in match.teacher_ids.tolist()]
    unmatched_student = [x for x in range(student_logits.shape[-1]) if x not in match.student_ids.tolist()]
    matched_weight = len(pairs) / teacher_logits.shape[-1]
    rows = []
    for g in range(len(student_logits)):
        q = torch.softmax(student_logits[g] / tau[g], -1) * scales[0][g]
        p = torch.softmax(teacher_logits[g] / tau[g], -1) * scales[1][g]
        jsd = torch.zeros((), dtype=torch.float64)
        for t, s in pairs:
            a, b = p[t].clamp_min(1e-8), q[s].clamp_min(1e-8)
            m = beta * a + (1 - beta) * b
            jsd = jsd + beta * a * (a / m).log() + (1 - beta) * b * (b / m).log()
        unmatched = sorted_l1_loop([p[x] for x in unmatched_teacher], [q[x] for x in unmatched_student])
        rows.append(matched_weight * jsd + (1 - matched_weight) * unmatched)
    return torch.stack(rows)


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_gold_equals_the_entrywise_loop(beta):
    student_side, teacher_side = group_problem()
    match, _, _ = random_match("partial")
    tau = per_group_temperature()
    student_all = student_side[0].clone().requires_grad_(True)
    floor = math.log(1e-8)

    def ours(logits):
        later = later_tokens(student_side, teacher_side, tau, logits, floor)
        return gold(logits[student_side[3]], teacher_side[0][teacher_side[3]], match, tau, beta, later=later)

    def loop(logits):
        later = later_tokens(student_side, teacher_side, tau, logits, floor)
        scales = (later.student_log_probs.exp(), later.teacher_log_probs.exp())
        return gold_loop(logits[student_side[3]], teacher_side[0][teacher_side[3]], match, tau, beta, scales)

    for a, b in zip(values_and_gradients(ours, student_all), values_and_gradients(loop, student_all)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- bad input and the registry
def test_an_empty_match_is_refused():
    student_logits, teacher_logits = group_logits(6, 7)
    empty = match_of([], 6, 7)
    for call in (lambda: hybrid(losses.get("fkl"), student_logits, teacher_logits, empty), lambda: gold(student_logits, teacher_logits, empty)):
        with pytest.raises(ValueError, match="vocabulary match is empty"):
            call()


def test_mismatched_shapes_name_both_sizes():
    match, _, _ = random_match("partial")
    student_logits, teacher_logits = group_logits(10, 12)
    with pytest.raises(ValueError, match="student's have 5 rows, the teacher's 4"):
        hybrid(losses.get("fkl"), student_logits, teacher_logits[:4], match)
    with pytest.raises(ValueError, match=r"the student logits have 8 entries \(student 8, teacher 12\)"):
        hybrid(losses.get("fkl"), student_logits[:, :8].detach(), teacher_logits, match_of([(0, 9)], 10, 12))
    with pytest.raises(ValueError, match=r"\[groups, vocabulary\]"):
        uld(student_logits[None], teacher_logits[None])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])])
def test_non_positive_temperature_is_refused(temperature):
    match, _, _ = random_match("partial")
    student_logits, teacher_logits = group_logits(10, 12)
    for call in (
        lambda: hybrid(losses.get("fkl"), student_logits, teacher_logits, match, temperature),
        lambda: uld(student_logits, teacher_logits, temperature),
        lambda: gold(student_logits, teacher_logits, match, temperature),
    ):
        with pytest.raises(ValueError, match="temperature"):
            call()


def test_the_registry_builds_each_objective_and_refuses_unknown_names_and_parameters():
    assert available() == ["gold", "hybrid", "uld"]
    fkl = losses.get("fkl")
    match, _, _ = random_match("partial")
    student_logits, teacher_logits = group_logits(10, 12)
    built = objective("hybrid", fkl, unmatched_weight=0.3)
    torch.testing.assert_close(built(student_logits, teacher_logits, match, 2.0), hybrid(fkl, student_logits, teacher_logits, match, 2.0, 0.3))
    torch.testing.assert_close(objective("gold", fkl, beta=0.3)(student_logits, teacher_logits, match), gold(student_logits, teacher_logits, match, beta=0.3))
    torch.testing.assert_close(objective("uld")(student_logits, teacher_logits, match), uld(student_logits, teacher_logits))
    assert built.scaled_by_tau_sq and not objective("uld").scaled_by_tau_sq and not objective("gold").scaled_by_tau_sq
    with pytest.raises(ValueError, match="valid objectives: gold, hybrid, uld"):
        objective("x-token", fkl)
    with pytest.raises(ValueError, match="takes no parameter beta; its parameters: unmatched_weight, later_positions"):
        objective("hybrid", fkl, beta=0.5)
    with pytest.raises(ValueError, match="needs a divergence"):
        objective("hybrid")
    with pytest.raises(ValueError, match="valid choices: none, group_probability"):
        objective("hybrid", fkl, later_positions="merge")
    with pytest.raises(ValueError, match="needs LaterTokens with student_log_probs"):
        objective("hybrid", fkl, later_positions="group_probability")(student_logits, teacher_logits, match)
