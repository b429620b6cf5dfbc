"""Two CPU processes over gloo: token policies decide on the global batch."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning import DistillationModule, InstructionDataModule
from kd_lightning.callbacks import InverseDifficultyTemperature, LossAdaptiveTokenFocusing, TokenPolicy
from kd_lightning.data.cross_tokenizer import CrossTokenizerDataModule
from kd_lightning.models import tiny_causal_lm
from test_cross_tokenizer_training import cross_dirs, write_records  # noqa: F401 (cross_dirs is a fixture)


class FixedFocus(LossAdaptiveTokenFocusing):
    """LATF held at a ratio of 0.3."""

    def __init__(self):
        super().__init__(warmup_steps=1000)
        self.ratio = 0.3

class Recorder(TokenPolicy):
    """Runs last and writes what each rank's policies decided."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def __call__(self, tokens):
        record = {"difficulty": tokens.difficulty().tolist(), "keep": tokens.keep.tolist(), "tau": tokens.temperature.tolist()}
        path = Path(self.out_dir) / f"step{tokens.step}_rank{self.trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def test_policies_decide_on_the_global_batch(datamodule, tmp_path):
    module = DistillationModule(student=tiny_causal_lm(seed=2), teacher=tiny_causal_lm(num_layers=2, seed=1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        callbacks=[FixedFocus(), InverseDifficultyTemperature(), Recorder(str(tmp_path))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule)
    for step in (0, 1):
        ranks = [json.loads((tmp_path / f"step{step}_rank{rank}.json").read_text()) for rank in (0, 1)]
        assert all(len(rank["difficulty"]) > 0 for rank in ranks)
        difficulty = torch.tensor([value for rank in ranks for value in rank["difficulty"]])
        keep = torch.tensor([value for rank in ranks for value in rank["keep"]])
        # ⌈r·N⌉ of the global N, split unevenly between ranks as their difficulties fall
        assert keep.sum() == math.ceil(0.3 * len(keep))
        assert difficulty[keep].min() >= difficulty[~keep].max()
        # IDTS: one median, over the kept tokens of both ranks
        tau = torch.tensor([value for rank in ranks for value in rank["tau"]])
        expected = torch.exp(-0.5 * torch.tanh(torch.log(difficulty / difficulty[keep].quantile(0.5))))
        torch.testing.assert_close(tau[keep], expected[keep])


def parallel_strategy(name):
    from kd_lightning.strategies import SpawnedModelParallelStrategy

    return "ddp_spawn" if name == "ddp" else SpawnedModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


class FirstFourExamples(InstructionDataModule):
    """One global batch of examples 0-3: whole on one process, 0, 2 and 1, 3 on two."""

    def train_dataloader(self):
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        return self.loader(self.train_set.select(range(rank, 4, world_size)), shuffle=False)


def one_step(devices, strategy, module_factory, datamodule):
    """The loss and student weights after one SGD step of ``module_factory()`` on ``datamodule``'s
    first four examples, on one process or two under ``strategy``."""
    module = module_factory()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=parallel_strategy(strategy) if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule)
    return trainer.callback_metrics["train/loss"], [p.detach().clone() for p in module.student.parameters()]


def assert_two_ranks_equal_one(strategy, module_factory, datamodule_factory):
    single_loss, single_weights = one_step(1, strategy, module_factory, datamodule_factory(4))
    double_loss, double_weights = one_step(2, strategy, module_factory, datamodule_factory(2))
    torch.testing.assert_close(double_loss, single_loss)
    for double, single in zip(double_weights if strategy == "ddp" else [], single_weights):
        torch.testing.assert_close(double, single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_ranks_equal_one_rank_on_the_same_global_batch(strategy, tokenizer, records):
    """Loss (and, under DDP, the update) of a 2-process step equal those of 1 process on the
    same 4 examples: the mean over the global batch's tokens, not a mean of per-rank means.
    (FSDP's sharded weights stay in the processes; its loss is compared.) The DDP case is
    slow: in the default suite, the FSDP case checks the token loss's global mean and
    test_two_ranks_equal_one_rank_across_tokenizers a DDP update against one process's."""
    from functools import partial

    def module():
        return DistillationModule(
            student=tiny_causal_lm(seed=2),
            teacher=tiny_causal_lm(num_layers=2, initializer_range=0.3, seed=1),
            optimizer=partial(torch.optim.SGD, lr=1.0),
            lr_scheduler="constant",
        )

    def datamodule(batch_size):
        return FirstFourExamples(tokenizer, dataset=records, max_length=256, val_size=4, batch_size=batch_size)

    assert_two_ranks_equal_one(strategy, module, datamodule)


class FirstFourCrossExamples(FirstFourExamples, CrossTokenizerDataModule):
    """Examples 0-3 of a cross-tokenizer data set, split between the ranks as FirstFourExamples."""


def test_two_ranks_equal_one_rank_across_tokenizers(cross_dirs, tmp_path):
    """The same under DDP with a teacher of another tokenizer (cross_tokenizer=gold, GOLD's
    merge included): the KD mean runs over the global batch's aligned groups."""
    from functools import partial

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_lightning.cross_tokenizer import CrossTokenizer, tokenizer_match

    teacher_tokenizer, student_tokenizer = (AutoTokenizer.from_pretrained(path) for path in cross_dirs)
    cross = CrossTokenizer("gold", tokenizer_match(teacher_tokenizer, student_tokenizer))
    path = write_records(tmp_path / "data.jsonl")

    def module():
        teacher, student = (AutoModelForCausalLM.from_pretrained(directory) for directory in cross_dirs)
        return DistillationModule(student=student, teacher=teacher, cross_tokenizer=cross,
                                  optimizer=partial(torch.optim.SGD, lr=1.0), lr_scheduler="constant")

    def datamodule(batch_size):
        return FirstFourCrossExamples(student_tokenizer, teacher_tokenizer, path=path, max_length=170, val_size=2,
                                      batch_size=batch_size, shuffle=False)

    assert_two_ranks_equal_one("ddp", module, datamodule)
