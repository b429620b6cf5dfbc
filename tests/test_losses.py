"""The divergence library against float64 references written straight from SPEC §2."""

import math

import pytest
import torch

from kd_lightning import losses

VOCAB = 11


# ---------------------------------------------------------------- float64 references
def reference(name, student_logits, teacher_logits, temperature, **params):
    """D per token from the SPEC formulas, in float64 probability space (V×V for CSD)."""
    z, t = student_logits.double(), teacher_logits.double()
    tau = temperature.double().unsqueeze(-1) if torch.is_tensor(temperature) else temperature
    q, p = torch.softmax(z / tau, -1), torch.softmax(t / tau, -1)

    def kl(a, b):  # 0 · log 0 = 0
        return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        alpha = params.get("alpha", 0.1)
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        alpha = params.get("alpha", 0.1)
        return kl(q, (1 - alpha) * p + alpha * q)
    if name == "akl":
        mu = params.get("mu", 0.5)
        with torch.no_grad():
            gap = (p - q).abs()
            order = p.argsort(-1, descending=True)
            cumulative = p.gather(-1, order).cumsum(-1)
            head_size = (cumulative < mu).sum(-1, keepdim=True) + 1  # first prefix reaching μ
            ranks = torch.arange(p.shape[-1]).expand_as(p)
            head = torch.zeros_like(p).scatter(-1, order, (ranks < head_size).double())
            g = (gap * head).sum(-1) / gap.sum(-1)
        return g * kl(p, q) + (1 - g) * kl(q, p)
    if name == "abkd":
        alpha, beta = params.get("alpha", 0.2), params.get("beta", 0.7)
        s = alpha + beta
        bracket = p**alpha * q**beta - alpha / s * p**s - beta / s * q**s
        return -bracket.sum(-1) / (alpha * beta)
    if name == "csd":
        weighting, mix = params.get("weighting", "ss"), params.get("mix", 0.5)
        delta = (z - t) / tau
        qd, pd = q.detach(), p.detach()
        w1, w2 = {
            "ss": (qd, qd),
            "us": (torch.full_like(qd, 1 / qd.shape[-1]), qd),
            "ts": (pd, qd),
            "mix": (mix * pd + (1 - mix) * qd,) * 2,
        }[weighting]
        pair_gaps = (delta.unsqueeze(-1) - delta.unsqueeze(-2)).square()
        return 0.25 * (w1.unsqueeze(-1) * w2.unsqueeze(-2) * pair_gaps).sum((-1, -2))
    raise KeyError(name)


CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.3}),
    ("tvd", {}),
    ("skl", {}),
    ("skl", {"alpha": 0.4}),
    ("srkl", {}),
    ("srkl", {"alpha": 0.4}),
    ("akl", {}),
    ("akl", {"mu": 0.8}),
    ("abkd", {}),
    ("abkd", {"alpha": 0.5, "beta": 0.5}),
    ("abkd", {"alpha": 1.2, "beta": 0.3}),
    ("csd", {}),
    ("csd", {"weighting": "us"}),
    ("csd", {"weighting": "ts"}),
    ("csd", {"weighting": "mix", "mix": 0.3}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


def logits_pair(*shape, scale=3.0, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*shape, VOCAB, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(*shape, VOCAB, generator=generator, dtype=torch.float64)).to(dtype)
    return student, teacher


def value_and_grad(fn, student_logits):
    student_logits = student_logits.detach().clone().requires_grad_(True)
    value = fn(student_logits)
    (grad,) = torch.autograd.grad(value.sum(), student_logits)
    return value.detach(), grad


# ------------------------------------------------------------------- the registry
def test_available_lists_the_nine_sorted():
    assert losses.available() == ["abkd", "akl", "csd", "fkl", "jsd", "rkl", "skl", "srkl", "tvd"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown divergence 'kl2'.*abkd, akl, csd, fkl, jsd, rkl, skl, srkl, tvd"):
        losses.get("kl2")


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(ValueError, match="no parameter gamma.*beta"):
        losses.get("jsd", gamma=0.1)
    with pytest.raises(ValueError, match="no parameter beta.*none"):
        losses.get("fkl", beta=0.1)


@pytest.mark.parametrize(
    "name, params",
    [
        ("jsd", {"beta": 0.0}),
        ("jsd", {"beta": 1.0}),
        ("skl", {"alpha": 1.5}),
        ("srkl", {"alpha": -0.1}),
        ("akl", {"mu": 1.0}),
        ("abkd", {"alpha": 0.0}),
        ("abkd", {"beta": -0.5}),
        ("csd", {"weighting": "xx"}),
        ("csd", {"weighting": "mix", "mix": 1.5}),
        ("jsd", {"beta": "half"}),
    ],
)
def test_parameter_out_of_range(name, params):
    with pytest.raises(ValueError, match="|".join(params)):
        losses.get(name, **params)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), torch.tensor([1.0, 0.0])])
def test_non_positive_temperature(temperature):
    student, teacher = logits_pair(2)
    with pytest.raises(ValueError, match="temperature"):
        losses.get("fkl")(student, teacher, temperature)


def test_vocabulary_mismatch_names_both_sizes():
    student = torch.randn(2, 151936)
    teacher = torch.randn(2, 152064)
    with pytest.raises(ValueError, match="151936.*152064"):
        losses.get("rkl")(student, teacher)


# --------------------------------------------------- against the float64 reference
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-tau", "per-token-tau"])
def test_matches_reference_value_and_gradient(name, params, per_token):
    student, teacher = logits_pair(3, 4, dtype=torch.float64)
    temperature = torch.linspace(0.5, 4.0, 12).reshape(3, 4).double() if per_token else 2.0
    divergence = losses.get(name, **params)

    value, grad = value_and_grad(lambda z: divergence(z, teacher, temperature), student)
    expected, expected_grad = value_and_grad(lambda z: reference(name, z, teacher, temperature, **params), student)

    assert value.shape == (3, 4) and value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_float32_close_to_float64_reference(name, params):
    student, teacher = logits_pair(64)
    value, grad = value_and_grad(lambda z: losses.get(name, **params)(z, teacher, 1.5), student)
    expected, expected_grad = value_and_grad(lambda z: reference(name, z, teacher, 1.5, **params), student)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_per_token_temperature_equals_one_call_per_token(name, params):
    student, teacher = logits_pair(5, dtype=torch.float64)
    temperatures = torch.tensor([0.3, 1.0, 2.0, 4.0, 7.5], dtype=torch.float64)
    divergence = losses.get(name, **params)
    batched = divergence(student, teacher, temperatures)
    one_by_one = torch.stack([divergence(student[i], teacher[i], float(tau)) for i, tau in enumerate(temperatures)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_temperature_broadcasts_over_leading_dims(name, params):
    student, teacher = logits_pair(2, 3, dtype=torch.float64)
    per_sequence = torch.tensor([[0.5], [3.0]], dtype=torch.float64)  # [2, 1] against [2, 3]
    divergence = losses.get(name, **params)
    value = divergence(student, teacher, per_sequence)
    torch.testing.assert_close(value[1], divergence(student[1], teacher[1], 3.0))


# --------------------------------------------------------------------- properties
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_non_negative_and_zero_when_distributions_match(name, params):
    student, teacher = logits_pair(200, scale=5.0)
    divergence = losses.get(name, **params)
    assert (divergence(student, teacher, 1.0) >= 0).all()
    # p = q exactly when the logits differ by a constant per token
    shifted = teacher + torch.randn(200, 1)
    torch.testing.assert_close(divergence(shifted, teacher, 1.0), torch.zeros(200), rtol=0, atol=2e-6)


@pytest.mark.parametrize("weighting", ["ss", "us", "ts", "mix"])
def test_csd_invariant_to_logit_shifts(weighting):
    student, teacher = logits_pair(4, 6, dtype=torch.float64)
    csd = losses.get("csd", weighting=weighting)
    value = csd(student, teacher, 1.7)
    torch.testing.assert_close(csd(student + 123.0, teacher, 1.7), value)
    torch.testing.assert_close(csd(student, teacher - 45.0, 1.7), value)
    torch.testing.assert_close(csd(student + torch.randn(4, 6, 1, dtype=torch.float64), teacher, 1.7), value)


@pytest.mark.parametrize("weighting", ["ss", "us", "ts", "mix"])
def test_csd_gradient_formula(weighting):
    """∂D/∂z = ½ (w1 ⊙ (Δ − E_w2[Δ]) + w2 ⊙ (Δ − E_w1[Δ])) / τ (SPEC §2)."""
    student, teacher = logits_pair(7, dtype=torch.float64)
    tau = 1.3
    csd = losses.get("csd", weighting=weighting, mix=0.25)
    _, grad = value_and_grad(lambda z: csd(z, teacher, tau), student)
    q, p = torch.softmax(student / tau, -1), torch.softmax(teacher / tau, -1)
    w1, w2 = {"ss": (q, q), "us": (torch.full_like(q, 1 / VOCAB), q), "ts": (p, q), "mix": (0.25 * p + 0.75 * q,) * 2}[
        weighting
    ]
    delta = (student - teacher) / tau
    mean1, mean2 = (w1 * delta).sum(-1, keepdim=True), (w2 * delta).sum(-1, keepdim=True)
    expected = 0.5 * (w1 * (delta - mean2) + w2 * (delta - mean1)) / tau
    torch.testing.assert_close(grad, expected)


def test_csd_ss_gradient_equals_rkl_gradient():
    student, teacher = logits_pair(9, dtype=torch.float64)
    temperature = torch.linspace(0.5, 3, 9, dtype=torch.float64)
    _, csd_grad = value_and_grad(lambda z: losses.get("csd")(z, teacher, temperature), student)
    _, rkl_grad = value_and_grad(lambda z: losses.get("rkl")(z, teacher, temperature), student)
    torch.testing.assert_close(csd_grad, rkl_grad)


@pytest.mark.parametrize("beta", [0.5])
def test_jsd_symmetric_at_one_half(beta):
    student, teacher = logits_pair(16)
    jsd = losses.get("jsd", beta=beta)
    torch.testing.assert_close(jsd(student, teacher, 1.0), jsd(teacher, student, 1.0))


def test_jsd_bounded_by_entropy_of_the_mixture_weights():
    student, teacher = logits_pair(64, scale=20.0)
    for beta in (0.1, 0.5, 0.8):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert (losses.get("jsd", beta=beta)(student, teacher, 1.0) <= bound + 1e-6).all()


def test_skew_divergences_are_kls_to_the_skewed_mixture():
    """skl(α) sits below fkl and tends to it as α → 0; srkl likewise below rkl."""
    student, teacher = logits_pair(32, scale=1.0, dtype=torch.float64)
    fkl, rkl = losses.get("fkl")(student, teacher), losses.get("rkl")(student, teacher)
    assert (losses.get("skl", alpha=0.3)(student, teacher) <= fkl).all()
    assert (losses.get("srkl", alpha=0.3)(student, teacher) <= rkl).all()
    torch.testing.assert_close(losses.get("skl", alpha=1e-9)(student, teacher), fkl, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(losses.get("srkl", alpha=1e-9)(student, teacher), rkl, rtol=1e-6, atol=1e-8)


def test_akl_is_a_convex_combination_of_fkl_and_rkl():
    student, teacher = logits_pair(32, dtype=torch.float64)
    fkl, rkl = losses.get("fkl")(student, teacher), losses.get("rkl")(student, teacher)
    akl = losses.get("akl")(student, teacher)
    assert (akl >= torch.minimum(fkl, rkl) - 1e-12).all() and (akl <= torch.maximum(fkl, rkl) + 1e-12).all()


def test_akl_head_weight_is_detached_and_one_half_when_equal():
    akl = losses.get("akl")
    teacher = torch.randn(3, VOCAB).log_softmax(-1)
    assert torch.equal(akl.head_weight(teacher, teacher), torch.full((3,), 0.5))
    student = torch.randn(3, VOCAB, requires_grad=True)
    assert not akl.head_weight(student.log_softmax(-1), teacher).requires_grad


def test_abkd_approaches_fkl_and_rkl_at_its_corners():
    student, teacher = logits_pair(8, dtype=torch.float64)
    fkl, rkl = losses.get("fkl")(student, teacher), losses.get("rkl")(student, teacher)
    torch.testing.assert_close(losses.get("abkd", alpha=1.0, beta=1e-6)(student, teacher), fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses.get("abkd", alpha=1e-6, beta=1.0)(student, teacher), rkl, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------- temperature limits
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_high_temperature_flattens_both_distributions(name, params):
    """τ → ∞: p and q → uniform, so D → 0."""
    student, teacher = logits_pair(6, dtype=torch.float64)
    divergence = losses.get(name, **params)
    values = [divergence(student, teacher, tau).max().item() for tau in (1.0, 1e2, 1e4)]
    assert values[2] < 1e-3 * max(values[0], 1e-12) and values[2] < values[1]


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "csd"])
def test_tau_squared_divergence_tends_to_logit_matching(name):
    """τ → ∞: τ²·D → c · Var_uniform(z − t) (Hinton's logit matching); c = ½ for KL and CSD, ⅛ for JSD(½)."""
    student, teacher = logits_pair(6, dtype=torch.float64)
    tau = 1e4
    logit_gap = student - teacher
    variance = (logit_gap - logit_gap.mean(-1, keepdim=True)).square().mean(-1)
    factor = 0.125 if name == "jsd" else 0.5
    torch.testing.assert_close(tau**2 * losses.get(name)(student, teacher, tau), factor * variance, rtol=1e-3, atol=0)


def test_low_temperature_hardens_to_argmax():
    """τ → 0: p and q → one-hot at their argmax; TVD → 1[argmax differ], JSD(½) → log 2 or 0."""
    student, teacher = logits_pair(64, dtype=torch.float64)
    differ = (student.argmax(-1) != teacher.argmax(-1)).double()
    tau = 1e-6
    torch.testing.assert_close(losses.get("tvd")(student, teacher, tau), differ)
    torch.testing.assert_close(losses.get("jsd")(student, teacher, tau), differ * math.log(2))


# ---------------------------------------------------------- dtypes and robustness
@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_dtype_grid(name, params, dtype):
    student, teacher = logits_pair(32, dtype=dtype)
    student.requires_grad_(True)
    value = losses.get(name, **params)(student, teacher, 2.0)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the result is the divergence of the inputs as given, computed in float32/64
    expected = reference(name, student.detach(), teacher, 2.0, **params)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)
    value.sum().backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()


def test_mixed_input_dtypes_compute_in_the_widest():
    student, teacher = logits_pair(4)
    assert losses.get("fkl")(student.bfloat16(), teacher.double()).dtype == torch.float64
    assert losses.get("fkl")(student.bfloat16(), teacher).dtype == torch.float32


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_bf16_nearly_equal_logits_never_negative(name, params):
    teacher = torch.randn(512, VOCAB, generator=torch.Generator().manual_seed(3)) * 4
    student = (teacher + 1e-2 * torch.randn_like(teacher)).bfloat16()
    values = losses.get(name, **params)(student, teacher.bfloat16(), 1.0)
    assert (values >= 0).all() and torch.isfinite(values).all()


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_shared_masked_vocabulary(name, params):
    """−inf logits on both sides: finite values and gradients, equal to the unmasked sub-vocabulary."""
    student, teacher = logits_pair(6, dtype=torch.float64)
    masked = torch.zeros(VOCAB, dtype=torch.bool)
    masked[[1, 4, 9]] = True
    divergence = losses.get(name, **params)
    value, grad = value_and_grad(
        lambda z: divergence(z.masked_fill(masked, -torch.inf), teacher.masked_fill(masked, -torch.inf), 1.5), student
    )
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (grad[:, masked] == 0).all()
    sub_value, sub_grad = value_and_grad(lambda z: divergence(z, teacher[:, ~masked], 1.5), student[:, ~masked])
    torch.testing.assert_close(value, sub_value)
    torch.testing.assert_close(grad[:, ~masked], sub_grad)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_teacher_only_masked_vocabulary(name, params):
    """Only the teacher masks entries (p = 0 where q > 0): D is finite where the formula is,
    and exactly +inf, never NaN, where it truly is infinite (rkl, akl's rkl part, csd)."""
    student, teacher = logits_pair(6)
    teacher[:, [0, 5]] = -torch.inf
    value, grad = value_and_grad(lambda z: losses.get(name, **params)(z, teacher, 1.0), student)
    if name in ("rkl", "akl", "csd"):
        assert (value == torch.inf).all()  # its gradient is undefined
    else:
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), reference(name, student, teacher, 1.0, **params), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(name, params, dtype):
    student, teacher = logits_pair(16, scale=1.0)
    student = (student / student.abs().amax(-1, keepdim=True) * 1e4).to(dtype)
    teacher = (teacher / teacher.abs().amax(-1, keepdim=True) * 1e4).to(dtype)
    value, grad = value_and_grad(lambda z: losses.get(name, **params)(z, teacher, 1.0), student)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all() and (value >= 0).all()


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_huge_logits_match_reference(name, params):
    """|logits| ~ 1e3 in float64: probabilities underflow in the reference only where they are exactly 0 there too."""
    student, teacher = logits_pair(8, scale=1.0, dtype=torch.float64)
    student, teacher = student * 30, teacher * 30
    value = losses.get(name, **params)(student, teacher, 1.0)
    expected = reference(name, student, teacher, 1.0, **params)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(value[finite], expected[finite], rtol=1e-8, atol=1e-10)


def test_csd_never_builds_a_vocabulary_square():
    """V = 50k per token would need 10 GB as a V×V float32 tensor; the O(V) form needs kilobytes."""
    student, teacher = torch.randn(2, 50_000), torch.randn(2, 50_000)
    for weighting in ("ss", "us", "ts", "mix"):
        assert torch.isfinite(losses.get("csd", weighting=weighting)(student, teacher, 1.0)).all()


def test_teacher_logits_need_no_grad_and_get_none():
    student, teacher = logits_pair(4)
    student.requires_grad_(True)
    losses.get("jsd")(student, teacher).sum().backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("mu", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_akl_head_of_flat_distributions_matches_a_sort(mu, dtype):
    """Flat p (high τ, large V): the head is found by radix select, not the top-16 shortcut."""
    probs = torch.softmax(torch.randn(6, 5000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.3, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = torch.nn.functional.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))
    expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < mu)
    head = losses.get("akl", mu=mu).in_head(probs)
    assert expected.sum() > 6 * 16 and torch.equal(head, expected)


@pytest.mark.parametrize("name, params", CASES, ids=CASE_IDS)
def test_value_and_gradient_come_from_one_set_of_terms(name, params):
    """``values_and_logit_gradients`` is D (as ``forward`` gives it) and ``∂D/∂(z/τ)`` (as
    autograd gives it), from one call of ``terms``."""
    divergence = losses.get(name, **params)
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 19, generator=generator, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(6, 19, generator=generator, dtype=torch.float64)
    expected = divergence(student, teacher, 2.0)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), student)
    calls = []
    terms = divergence.terms
    divergence.terms = lambda *args: calls.append(1) or terms(*args)
    log_q, log_p = (torch.log_softmax(logits.detach() / 2.0, -1) for logits in (student, teacher))
    value, gradient = divergence.values_and_logit_gradients(log_q, log_p)
    assert len(calls) == 1
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(gradient / 2.0, expected_gradient)
