"""Token policies (SPEC §3): LATF ratio dynamics, IDTS temperatures, schedules, resume."""

import csv
import math

import lightning as L
import pytest
import torch

from kd_lightning import DistillationModule, TokenBatch, losses
from kd_lightning.callbacks import InverseDifficultyTemperature, LossAdaptiveTokenFocusing
from kd_lightning.models import tiny_causal_lm
from kd_lightning.schedule import TemperatureSchedule, scheduled_temperature


def latf(**kwargs):
    policy = LossAdaptiveTokenFocusing(**{"beta": 0.0, "warmup_steps": 3, **kwargs})  # beta 0: EMA = loss
    return policy


def feed(policy, losses_seen):
    ratios = []
    for loss in losses_seen:
        policy.update(loss)
        ratios.append(policy.ratio)
    return ratios


def token_batch(count=10, seed=0, temperature=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(count, 17, generator=generator) * torch.linspace(0.1, 4, count).unsqueeze(1)
    teacher = torch.randn(count, 17, generator=generator)
    tokens = TokenBatch(
        temperature=torch.full((count,), temperature),
        keep=torch.ones(count, dtype=torch.bool),
        step=0,
        compute_difficulty=lambda: losses.hellinger(student, teacher),
    )
    tokens.student_logits, tokens.teacher_logits = student, teacher  # for the tests' own checks
    return tokens


# ------------------------------------------------------------------------- LATF
def test_ratio_holds_during_warmup_and_sets_the_reference_at_its_end():
    policy = latf()
    assert feed(policy, [10.0, 5.0, 4.0]) == [1.0, 1.0, 1.0]
    assert policy.reference_loss == 4.0


def test_ratio_falls_when_the_loss_falls_and_rises_when_it_rises():
    policy = latf()
    feed(policy, [10.0, 10.0, 10.0])  # warm-up: L_ref = 10
    assert feed(policy, [9.0]) == [0.95] and policy.reference_loss == 9.0  # 9 < 10·0.95
    assert feed(policy, [8.6]) == [0.95]  # within ±5% of 9: hold
    assert feed(policy, [8.5])[0] == pytest.approx(0.95 * 0.95)  # 8.5 < 9·0.95 = 8.55
    assert feed(policy, [9.0])[0] == pytest.approx(0.95 * 0.95 * 1.05)  # 9.0 > 8.5·1.05 = 8.925
    assert policy.reference_loss == 9.0


def test_ratio_clamps_at_min_ratio_and_at_one():
    policy = latf(min_ratio=0.5)
    ratios = feed(policy, [100.0] * 3 + [100.0 * 0.9**k for k in range(1, 40)])
    assert min(ratios) == 0.5 and ratios[-1] == 0.5
    ratios = feed(policy, [1.2**k for k in range(1, 60)])
    assert max(ratios) == 1.0 and ratios[-1] == 1.0


def test_ema_uses_beta():
    policy = LossAdaptiveTokenFocusing(beta=0.99, warmup_steps=10)
    feed(policy, [2.0, 1.0])
    assert policy.ema_loss == pytest.approx(0.99 * 2.0 + 0.01 * 1.0)


def test_latf_keeps_the_hardest_ceil_r_n_tokens():
    tokens = token_batch(10)
    policy = latf()
    policy.ratio = 0.25
    policy(tokens)
    difficulty = losses.hellinger(tokens.student_logits, tokens.teacher_logits)
    assert tokens.keep.sum() == math.ceil(0.25 * 10)
    assert set(tokens.keep.nonzero().flatten().tolist()) == set(difficulty.topk(3).indices.tolist())


def test_latf_chooses_among_tokens_still_kept():
    tokens = token_batch(10)
    tokens.keep[:5] = False
    policy = latf()
    policy.ratio = 0.4
    policy(tokens)
    assert tokens.keep.sum() == 2 and not tokens.keep[:5].any()


def test_latf_state_round_trips():
    policy = latf()
    feed(policy, [10.0, 10.0, 10.0, 9.0, 8.0])
    restored = latf()
    restored.load_state_dict(policy.state_dict())
    assert restored.state_dict() == policy.state_dict()
    assert feed(restored, [7.0]) == feed(policy, [7.0])


def test_bad_latf_settings():
    with pytest.raises(ValueError, match="min_ratio"):
        LossAdaptiveTokenFocusing(min_ratio=0)


# ------------------------------------------------------------------------- IDTS
def test_idts_temperatures_follow_the_formula():
    tokens = token_batch(9)
    InverseDifficultyTemperature(c=0.5)(tokens)
    difficulty = losses.hellinger(tokens.student_logits, tokens.teacher_logits)
    expected = 2.0 * torch.exp(-0.5 * torch.tanh(torch.log(difficulty / difficulty.median())))
    torch.testing.assert_close(tokens.temperature, expected)
    hardest, easiest = difficulty.argmax(), difficulty.argmin()
    assert tokens.temperature[hardest] < 2.0 < tokens.temperature[easiest]


def test_idts_median_is_over_kept_tokens_only():
    tokens = token_batch(9)
    difficulty = losses.hellinger(tokens.student_logits, tokens.teacher_logits)
    tokens.keep = difficulty > difficulty.median()  # the 4 hardest
    InverseDifficultyTemperature(c=0.5)(tokens)
    kept_median = difficulty[tokens.keep].quantile(0.5)
    expected = 2.0 * torch.exp(-0.5 * torch.tanh(torch.log(difficulty / kept_median)))
    torch.testing.assert_close(tokens.temperature, expected)


def test_per_token_temperature_reaches_the_divergence(batch):
    """Fails if the module ignored the policy's temperatures: the loss must equal
    Σ τ_i² D(p^{τ_i}, q^{τ_i}) / N with IDTS's τ_i, not the loss at the base τ."""
    teacher = tiny_causal_lm(num_layers=2, initializer_range=0.3, seed=1)
    module = DistillationModule(student=tiny_causal_lm(num_layers=1, seed=2), teacher=teacher, temperature=2.0)
    base = module.training_step(batch, 0)["loss"]
    captured = {}
    module.token_policies = [InverseDifficultyTemperature(), lambda tokens: captured.update(tau=tokens.temperature)]
    with_idts = module.training_step(batch, 0)["loss"]
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        student = module.student(input_ids=batch["input_ids"]).logits[:, :-1][labels != -100]
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1][labels != -100]
    tau = captured["tau"]
    assert tau.std() > 0
    expected = (tau**2 * module.divergence(student, teacher_logits, tau)).mean()
    torch.testing.assert_close(with_idts, expected)
    assert not torch.isclose(with_idts, base)


# ------------------------------------------------------------------ the module
@pytest.mark.parametrize("loss_impl", ["eager", "fused"])
def test_dropped_tokens_cost_no_gradient_work(batch, loss_impl, monkeypatch):
    """With LATF keeping k tokens, the student's lm_head backpropagates k rows only."""
    module = DistillationModule(student=tiny_causal_lm(seed=2), teacher=tiny_causal_lm(seed=1), loss_impl=loss_impl)
    policy = latf()
    policy.ratio = 0.3
    module.token_policies.append(policy)
    rows_with_gradient = []
    module.student.lm_head.register_full_backward_hook(
        lambda head, grad_inputs, grad_outputs: rows_with_gradient.append(len(grad_outputs[0]))
    )
    fused = losses.fused_divergence

    def recording_fused(divergence, student_hidden, *args, **kwargs):
        rows_with_gradient.append(len(student_hidden))
        return fused(divergence, student_hidden, *args, **kwargs)

    monkeypatch.setattr(losses, "fused_divergence", recording_fused)
    out = module.training_step(batch, 0)
    out["loss"].backward()
    counted = int((batch["labels"][:, 1:] != -100).sum())
    assert rows_with_gradient == [math.ceil(0.3 * counted)] == [int(out["kept_tokens"])]


# -------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "schedule, progress, expected",
    [
        ("constant", 0.5, 1.0),
        ("linear", 0.0, 1.0),
        ("linear", 0.5, 2.5),
        ("linear", 1.0, 4.0),
        ("cosine", 0.0, 1.0),
        ("cosine", 0.5, 2.5),
        ("cosine", 1.0, 4.0),
        ("cosine", 0.25, 4.0 - 3.0 * (1 + math.cos(math.pi * 0.25)) / 2),
    ],
)
def test_schedules(schedule, progress, expected):
    assert scheduled_temperature(schedule, 1.0, 4.0, progress) == pytest.approx(expected)


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match="valid: constant, linear, cosine"):
        TemperatureSchedule("step")
    with pytest.raises(ValueError, match="temperature"):
        TemperatureSchedule("linear", 1.0, 0.0)


# ------------------------------------------------------------- fit and resume
def test_fit_logs_selection_and_resume_restores_state(datamodule, tmp_path):
    def run(max_steps, ckpt_path=None):
        policy = LossAdaptiveTokenFocusing(warmup_steps=1, beta=0.5)
        module = DistillationModule(
            student=tiny_causal_lm(seed=2),
            teacher=tiny_causal_lm(num_layers=2, initializer_range=0.3, seed=1),
            temperature=TemperatureSchedule("linear", 1.0, 3.0),
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
            callbacks=[policy, InverseDifficultyTemperature()],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            log_every_n_steps=1,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        return trainer, policy

    trainer, policy = run(3)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for metric in ("selection/ratio", "selection/ema_loss", "selection/kept_tokens", "temperature/mean"):
        assert metric in header
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert any(state.get("steps") == 3 for state in saved.values())

    resumed_trainer, resumed = run(4, ckpt_path=checkpoint)
    assert resumed.steps == 4 and resumed.warmup_steps == 1
    assert resumed_trainer.lightning_module.temperature == pytest.approx(3.0)


# ---------------------------------------------------------- one owner of τ
def test_the_module_reads_tau_from_its_schedule_every_step(datamodule, tmp_path):
    """τ(step) from one schedule object, here any callable of the step: the logged
    temperature/mean of each step is the schedule's, and nothing else sets it."""
    module = DistillationModule(
        student=tiny_causal_lm(seed=2), teacher=tiny_causal_lm(num_layers=2, seed=1), temperature=lambda step: 1.0 + step
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule)
    rows = csv.DictReader((tmp_path / "metrics.csv").open())
    logged = {int(row["step"]): float(row["temperature/mean"]) for row in rows if row.get("temperature/mean")}
    assert logged == {0: 1.0, 1: 2.0, 2: 3.0}
    assert module.temperature == 4.0  # the schedule at the global step now
    with pytest.raises(AttributeError):
        module.temperature = 2.0  # τ has one owner: set the schedule, not the attribute


def test_schedule_progress_runs_over_the_fit():
    schedule = TemperatureSchedule("linear", 1.0, 3.0)
    assert [schedule(step, 5) for step in range(6)] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    assert TemperatureSchedule("constant", 2.0)(7, 10) == 2.0
