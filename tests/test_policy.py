"""policy=offline|on_policy|mixed: training on the student's own responses."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from kd_lightning.callbacks import StudentResponses
from kd_lightning.callbacks.policy import response_batch, split_prompts
from kd_lightning.generation import sample_continuations
from kd_lightning.models import tiny_causal_lm
from kd_lightning.train import fit
from test_train import TINY, compose_config, kd_train


def test_split_then_rebuild_gives_back_the_batch(batch):
    prompts = split_prompts(batch)
    responses = [labels[labels != -100] for labels in batch["labels"]]
    rebuilt = response_batch(prompts, responses, pad_token_id=0)
    width = rebuilt["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(rebuilt[key], batch[key][:, :width])
    assert not batch["attention_mask"][:, width:].any()


def test_on_policy_batch_holds_student_tokens_after_the_unchanged_masked_prompt(batch, tokenizer):
    student = tiny_causal_lm(num_layers=1, seed=2)
    callback = StudentResponses(probability=1.0, max_new_tokens=6)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10, datamodule=SimpleNamespace(tokenizer=tokenizer))
    module = SimpleNamespace(student=student, log=lambda *args, **kwargs: None)
    prompts = split_prompts(batch)
    torch.manual_seed(7)
    expected = sample_continuations(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 6)
    torch.manual_seed(7)
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert student.training  # generation leaves the student's mode as it was
    for row, (prompt, response) in enumerate(zip(prompts, expected)):
        end = len(prompt) + len(response)
        assert torch.equal(batch["input_ids"][row, : len(prompt)], prompt)
        assert (batch["labels"][row, : len(prompt)] == -100).all()
        assert torch.equal(batch["input_ids"][row, len(prompt) : end], response)
        assert torch.equal(batch["labels"][row, len(prompt) : end], response)
        assert batch["attention_mask"][row, :end].all() and not batch["attention_mask"][row, end:].any()


def test_left_padded_batches_are_refused(batch):
    batch["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        split_prompts(batch)


def test_the_source_follows_lambda_and_the_buffer():
    on_policy = StudentResponses(probability=0.3)
    sources = [on_policy.source(step, 1000)[0] for step in range(1000)]
    assert set(sources) == {"generate", "dataset"} and abs(sources.count("generate") / 1000 - 0.3) < 0.05
    assert sources == [on_policy.source(step, 1000)[0] for step in range(1000)]  # the same after a resume
    mixed = StudentResponses(probability=1.0, buffer_size=4)
    assert mixed.source(999, 1000)[0] == "generate"  # the buffer fills first
    mixed.buffer = [(torch.tensor([1]), torch.tensor([2]))] * 4
    late = [mixed.source(step, 1000)[0] for step in range(900, 1000)]
    assert late.count("replay") > 80  # fresh samples become rare: λ (1 − t/T)


def test_lambda_rises_with_the_validation_loss():
    callback = StudentResponses(probability=0.0, buffer_size=10, loss_margin=0.1, increase=0.1)
    for val_loss, expected in [(2.0, 0.0), (2.05, 0.0), (2.2, 0.1), (2.25, 0.1), (1.0, 0.1), (2.4, 0.2)]:
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/loss": torch.tensor(val_loss)})
        callback.on_validation_end(trainer, None)
        assert callback.probability == pytest.approx(expected)


def test_lambda_zero_trains_exactly_offline(tmp_path):
    offline = fit(compose_config(tmp_path / "offline", *TINY, "policy=offline"))
    zero = fit(compose_config(tmp_path / "zero", *TINY, "policy=on_policy", "policy.lambda=0"))
    losses = [pd.read_csv(trainer.logger.log_dir + "/metrics.csv")["train/loss"].dropna().tolist() for trainer in (offline, zero)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.parametrize("overrides", [("divergence=csd", "selection=adakd"), ("divergence=rkl", "module.loss_impl=eager")])
def test_on_policy_runs_with_any_divergence_selection_and_loss_path(overrides, tmp_path):
    trainer = fit(compose_config(tmp_path, *TINY, "policy=on_policy", "callbacks.student_responses.max_new_tokens=8", *overrides))
    metrics = pd.read_csv(trainer.logger.log_dir + "/metrics.csv")
    assert metrics["policy/on_policy_fraction"].dropna().tolist() == [1.0, 1.0]
    assert metrics["train/loss"].dropna().map(math.isfinite).all()


def test_mixed_buffer_round_trips_through_a_checkpoint(tmp_path):
    out = tmp_path / "OUT"
    common = ("model=tiny", "policy=mixed", "policy.lambda=1.0", "callbacks.student_responses.max_new_tokens=8", f"hydra.run.dir={out}")
    first = kd_train(*common, "trainer.max_steps=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    saved = next(value for key, value in state.items() if key.startswith("StudentResponses"))
    assert len(saved["buffer"]) == 3 * 4 and saved["probability"] == 1.0
    resumed = kd_train(*common, "trainer.max_steps=5", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    buffer = next(value for key, value in state.items() if key.startswith("StudentResponses"))["buffer"]
    assert len(buffer) == 5 * 4
    for (prompt, response), (old_prompt, old_response) in zip(buffer, saved["buffer"]):
        assert torch.equal(prompt, old_prompt) and torch.equal(response, old_response)
    metrics = pd.read_csv(out / "metrics.csv")  # the resumed run appends to the first one's rows
    assert metrics["policy/on_policy_fraction"].dropna().tolist() == [1.0] * 5
    assert metrics["policy/buffer_size"].dropna().tolist() == [4.0, 8.0, 12.0, 16.0, 20.0]


def test_on_policy_under_fsdp_with_two_processes(tmp_path):
    """Every rank generates for its own share; sharded generation stays in step (synced_gpus)."""
    out = tmp_path / "OUT"
    run = kd_train(
        "model=tiny", "trainer=fsdp", "trainer.devices=2", "trainer.max_steps=2", "policy=on_policy",
        "callbacks.student_responses.max_new_tokens=8", f"hydra.run.dir={out}", cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert pd.read_csv(out / "metrics.csv")["policy/on_policy_fraction"].dropna().tolist() == [1.0, 1.0]
