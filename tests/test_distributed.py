"""Two CPU processes over gloo: token policies decide on the global batch."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning import DistillationModule, InstructionDataModule
from kd_lightning.callbacks import InverseDifficultyTemperature, LossAdaptiveTokenFocusing, TokenPolicy
from kd_lightning.models import tiny_causal_lm


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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_on_the_same_global_batch(strategy, tokenizer, records):
    """Loss (and, under DDP, the update) of a 2-process step equal those of 1 process on the
    same 4 examples: the mean over the global batch's tokens, not a mean of per-rank means.
    (FSDP's sharded weights stay in the processes; its loss is compared.)"""
    from functools import partial

    def one_step(devices):
        datamodule = FirstFourExamples(tokenizer, dataset=records, max_length=256, val_size=4, batch_size=4 // devices)
        module = DistillationModule(
            student=tiny_causal_lm(seed=2),
            teacher=tiny_causal_lm(num_layers=2, initializer_range=0.3, seed=1),
            optimizer=partial(torch.optim.SGD, lr=1.0),
            lr_scheduler="constant",
        )
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

    single_loss, single_weights = one_step(1)
    double_loss, double_weights = one_step(2)
    torch.testing.assert_close(double_loss, single_loss)
    for double, single in zip(double_weights if strategy == "ddp" else [], single_weights):
        torch.testing.assert_close(double, single, rtol=1e-4, atol=1e-6)
