"""DistillationModule: the SPEC §1 loss, the frozen teacher, checkpoints, token policies."""

import math
from functools import partial

import lightning as L
import pytest
import torch

from kd_lightning import DistillationModule, TokenBatch, losses
from kd_lightning.heads import EagerHead, FusedHead, counted_states
from kd_lightning.models import copy_layers, tiny_causal_lm


def make_module(**kwargs):
    teacher = tiny_causal_lm(num_layers=2, hidden_size=32, initializer_range=0.3, seed=1)
    kwargs.setdefault("student", tiny_causal_lm(num_layers=1, hidden_size=32, seed=2))
    return DistillationModule(teacher=teacher, **kwargs)


def trainer(tmp_path, max_steps=2, **kwargs):
    settings = dict(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=1,
        val_check_interval=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**settings, **kwargs})


def manual_loss(module, batch, temperature, keep=None):
    """Σ τ_i² D_i / (number of kept counted tokens), straight from SPEC §1."""
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    with torch.no_grad():
        student = module.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        teacher = module.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    student, teacher = student[counted], teacher[counted]
    keep = torch.ones(len(student), dtype=torch.bool) if keep is None else keep
    temperature = torch.as_tensor(temperature, dtype=torch.float32).expand(len(student))[keep]
    per_token = temperature**2 * module.divergence(student[keep], teacher[keep], temperature)
    return per_token.sum() / keep.sum()


def test_training_step_outside_a_trainer_is_the_global_token_mean(batch):
    module = make_module(divergence="jsd", divergence_kwargs={"beta": 0.3}, temperature=2.0)
    out = module.training_step(batch, 0)
    torch.testing.assert_close(out["loss"], manual_loss(module, batch, 2.0))
    # a mean over tokens, not of per-sequence means: the sequences have unequal lengths
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    assert len(set(counts.tolist())) > 1 and out["kept_tokens"] == counts.sum()


def test_tau_squared_scaling_can_be_turned_off(batch):
    scaled = make_module(temperature=3.0).training_step(batch, 0)["loss"]
    plain = make_module(temperature=3.0, scale_by_tau_sq=False).training_step(batch, 0)["loss"]
    torch.testing.assert_close(scaled, 9 * plain)


def test_cross_entropy_mixes_in(batch):
    module = make_module(ce_weight=0.25)
    out = module.training_step(batch, 0)
    torch.testing.assert_close(out["loss"], 0.75 * out["kd_loss"] + 0.25 * out["ce_loss"])
    labels = batch["labels"][:, 1:]
    logits = module.student(input_ids=batch["input_ids"]).logits[:, :-1]
    expected_ce = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out["ce_loss"], expected_ce.detach())


def test_teacher_frozen_in_eval_mode_and_outside_the_optimizer(batch, datamodule, tmp_path):
    module = make_module()
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    fit = trainer(tmp_path)
    fit.fit(module, datamodule)
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])


@pytest.mark.parametrize("name", losses.available())
def test_fit_a_few_steps_with_every_divergence(name, datamodule, tmp_path):
    module = make_module(divergence=name, temperature=2.0)
    student_before = [p.clone() for p in module.student.parameters()]
    fit = trainer(tmp_path)
    fit.fit(module, datamodule)
    assert fit.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters()))
    assert torch.isfinite(fit.callback_metrics["train/loss"]) and "val/loss" in fit.callback_metrics


def test_toy_run_loss_falls(datamodule):
    torch.manual_seed(0)
    module = make_module(divergence="fkl", optimizer=partial(torch.optim.AdamW, lr=3e-3))
    optimizer = module.optimizer_factory(module.student.parameters())
    batch = next(iter(datamodule.train_dataloader()))
    history = []
    for _ in range(40):
        loss = module.training_step(batch, 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def test_models_built_from_factories_in_configure_model(batch):
    module = DistillationModule(
        teacher=partial(tiny_causal_lm, num_layers=4, seed=3), student=partial(copy_layers, every=2)
    )
    assert not hasattr(module, "student")
    module.configure_model()
    assert len(module.student.model.layers) == 2 and not module.teacher.training
    assert torch.isfinite(module.training_step(batch, 0)["loss"])


def test_state_dict_and_checkpoint_hold_no_teacher(batch, datamodule, tmp_path):
    module = make_module()
    assert not [key for key in module.state_dict() if key.startswith("teacher.")]
    assert any(key.startswith("student.") for key in module.state_dict())
    fresh = make_module(student=tiny_causal_lm(num_layers=1, hidden_size=32, seed=9))
    fresh.load_state_dict(module.state_dict())  # strict: the live teacher is not "missing"
    torch.testing.assert_close(fresh.training_step(batch, 0)["loss"], module.training_step(batch, 0)["loss"])

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, callbacks=[checkpoint], enable_checkpointing=True).fit(module, datamodule)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not [key for key in saved["state_dict"] if "teacher" in key] and saved["global_step"] == 2

    resumed = make_module(student=tiny_causal_lm(num_layers=1, hidden_size=32, seed=9))
    fit = trainer(tmp_path, max_steps=4)
    fit.fit(resumed, datamodule, ckpt_path=tmp_path / "last.ckpt")
    assert fit.global_step == 4


def test_token_policy_keep_mask_and_temperature_reach_the_loss(batch):
    module = make_module(divergence="rkl", temperature=1.0)
    seen = {}

    def policy(tokens: TokenBatch):
        seen["difficulty"] = tokens.difficulty()
        tokens.keep[::2] = False
        tokens.temperature = torch.linspace(0.5, 4.0, len(tokens.keep))

    module.token_policies.append(policy)
    out = module.training_step(batch, 0)
    count = len(seen["difficulty"])
    keep = torch.ones(count, dtype=torch.bool)
    keep[::2] = False
    expected = manual_loss(module, batch, torch.linspace(0.5, 4.0, count), keep)
    torch.testing.assert_close(out["loss"], expected)
    assert out["kept_tokens"] == keep.sum()
    assert ((seen["difficulty"] >= 0) & (seen["difficulty"] <= 1)).all()
    # validation measures every counted token at the base temperature
    torch.testing.assert_close(module.validation_step(batch, 0)["loss"], manual_loss(module, batch, 1.0))


def test_padded_vocabularies_are_aligned(batch):
    teacher = tiny_causal_lm(vocab_size=259, seed=1)
    student = tiny_causal_lm(vocab_size=264, seed=2)  # embeddings padded beyond the tokenizer
    with pytest.raises(ValueError, match="vocabulary sizes differ.*264.*259"):
        DistillationModule(student=student, teacher=teacher).training_step(batch, 0)
    aligned = DistillationModule(student=student, teacher=teacher, vocab_size=259)
    assert torch.isfinite(aligned.training_step(batch, 0)["loss"])
    with pytest.raises(ValueError, match="has 2(59|64) logits but the tokenizer has 300 tokens"):
        DistillationModule(student=student, teacher=teacher, vocab_size=300).training_step(batch, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"divergence": "kl"}, "valid divergences: abkd, akl"),
        ({"temperature": 0.0}, "temperature must be finite and > 0"),
        ({"temperature": -2.0}, "temperature must be finite and > 0"),
        ({"ce_weight": 1.5}, "ce_weight"),
        ({"divergence": "jsd", "divergence_kwargs": {"beta": 1.0}}, "beta"),
        ({"loss_matmul_dtype": "bf16"}, "loss_matmul_dtype must be null, bfloat16"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def break_head(model, value):
    """Give ``model``'s lm_head a bias of zeros with ``value`` at token 5."""
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(259), requires_grad=False)
    model.lm_head.bias.data[5] = value


@pytest.mark.parametrize(
    "role, value, message",
    [
        ("teacher", -torch.inf, r"loss is \+inf at step 0: the divergence is \+inf on finite logits.*rkl.*bounded divergence"),
        ("teacher", torch.inf, r"loss is NaN at step 0: the teacher's logits are \+inf; the frozen teacher itself is broken"),
        ("teacher", torch.nan, r"loss is NaN at step 0: the teacher's logits are NaN"),
        ("student", torch.nan, r"loss is NaN at step 0: the student's logits are NaN; its weights have diverged: lower"),
    ],
)
def test_non_finite_loss_names_its_source(role, value, message, batch):
    """NaN or +inf, and from which: the student's logits, the teacher's, or the divergence."""
    module = make_module(divergence="rkl")
    break_head(getattr(module, role), value)
    with pytest.raises(FloatingPointError, match=message):
        module.training_step(batch, 0)


@pytest.mark.parametrize("name", ["fkl", "csd", "akl"])
@pytest.mark.parametrize("with_policy", [False, True])
def test_fused_and_eager_paths_agree(name, with_policy, batch):
    from kd_lightning.callbacks import InverseDifficultyTemperature

    results = []
    for loss_impl in ("eager", "fused"):
        module = make_module(divergence=name, temperature=2.0, loss_impl=loss_impl, chunk_size=37)
        if with_policy:
            module.token_policies.append(InverseDifficultyTemperature())
        out = module.training_step(batch, 0)
        out["loss"].backward()
        results.append((out["loss"].detach(), out["ce_loss"], [p.grad for p in module.student.parameters()]))
    (eager_loss, eager_ce, eager_grads), (fused_loss, fused_ce, fused_grads) = results
    torch.testing.assert_close(fused_loss, eager_loss)
    torch.testing.assert_close(fused_ce, eager_ce)
    for fused_grad, eager_grad in zip(fused_grads, eager_grads):
        torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-6)


def head_type(module, batch):
    """The loss head ``module`` uses on ``batch``."""
    return type(module.loss_head(counted_states(module.student, module.teacher, batch), selective=False))


def test_fused_path_falls_back_to_eager_where_it_cannot_apply(batch):
    assert head_type(make_module(), batch) is FusedHead
    assert head_type(make_module(ce_weight=0.5), batch) is FusedHead  # the cross-entropy joins the fused pass
    assert head_type(make_module(loss_impl="eager"), batch) is EagerHead
    biased = make_module()
    break_head(biased.student, 0.0)  # an lm_head with a bias: no fused path
    assert head_type(biased, batch) is EagerHead
    with pytest.raises(ValueError, match="loss_impl"):
        make_module(loss_impl="triton")


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    plain, checkpointed = make_module(), make_module(gradient_checkpointing=True)
    checkpointed.configure_model()
    assert checkpointed.student.is_gradient_checkpointing and not plain.student.is_gradient_checkpointing
    for module in (plain, checkpointed):
        module.train()
        module.training_step(batch, 0)["loss"].backward()
    for a, b in zip(plain.student.parameters(), checkpointed.student.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_unknown_teacher_placement_is_named():
    with pytest.raises(ValueError, match="sharded, replicated, offloaded"):
        make_module(teacher_placement="gpu")


def latf_at(ratio):
    """LATF keeping the ``ratio`` hardest tokens, its ratio pinned (δ = 0)."""
    from kd_lightning.callbacks import LossAdaptiveTokenFocusing

    policy = LossAdaptiveTokenFocusing(delta=0.0)
    policy.ratio = ratio
    return policy


@pytest.mark.parametrize(
    "kept_ratio, ce_weight", [(1.0, 0.5), (0.5, 0.5), (0.5, 1.0)], ids=["all-tokens", "latf-half", "latf-half-ce-only"]
)
def test_cross_entropy_mix_runs_fused_and_equals_eager(kept_ratio, ce_weight, batch):
    """ce_weight > 0 stays on the fused path, with LATF too: loss, its parts (the KD part
    still reported at ce_weight = 1) and the student's gradients equal the eager path's,
    in float64."""
    results = []
    for loss_impl in ("eager", "fused"):
        module = make_module(divergence="fkl", temperature=2.0, ce_weight=ce_weight, loss_impl=loss_impl, chunk_size=37)
        module.double().token_policies.append(latf_at(kept_ratio))
        assert head_type(module, batch) is (FusedHead if loss_impl == "fused" else EagerHead)
        out = module.training_step(batch, 0)
        out["loss"].backward()
        results.append([out["loss"].detach(), out["kd_loss"], out["ce_loss"], *(p.grad for p in module.student.parameters())])
    assert int(out["kept_tokens"]) == math.ceil(kept_ratio * int((batch["labels"][:, 1:] != -100).sum()))
    for fused, eager in zip(*results):
        torch.testing.assert_close(fused, eager)


def test_cross_entropy_mix_builds_no_full_vocabulary_logits(batch):
    """A fused training step with ce_weight = 0.5 and LATF, forward and backward, makes
    no tensor holding more rows of the vocabulary than a chunk or the hidden size; the
    same detector sees the eager path's logits of every counted token."""
    from test_fused import LogitRows

    hidden_size, chunk_size, vocab = 16, 8, 301
    counted = int((batch["labels"][:, 1:] != -100).sum())
    for loss_impl in ("fused", "eager"):
        module = DistillationModule(
            student=tiny_causal_lm(num_layers=1, hidden_size=hidden_size, vocab_size=vocab, seed=2),
            teacher=tiny_causal_lm(num_layers=1, hidden_size=hidden_size, vocab_size=vocab, seed=1),
            ce_weight=0.5, chunk_size=chunk_size, loss_impl=loss_impl,
        )
        module.token_policies.append(latf_at(0.5))
        with LogitRows(vocab) as recorder:
            module.training_step(batch, 0)["loss"].backward()
        if loss_impl == "fused":
            assert max(recorder.rows) <= max(chunk_size, hidden_size) < counted
        else:
            assert max(recorder.rows) >= counted


def test_bf16_loss_matmuls_stay_close_to_float32(batch):
    """``loss_matmul_dtype=bfloat16`` changes the loss and gradients by bf16 rounding only."""
    results = []
    for matmul_dtype in (None, "bfloat16"):
        module = make_module(temperature=2.0, ce_weight=0.5, loss_matmul_dtype=matmul_dtype)
        out = module.training_step(batch, 0)
        out["loss"].backward()
        results.append([out["loss"].detach(), *(p.grad for p in module.student.parameters())])
    for bf16, plain in zip(*results):
        assert bf16.dtype == plain.dtype == torch.float32
        torch.testing.assert_close(bf16, plain, rtol=0.05, atol=2e-3)
