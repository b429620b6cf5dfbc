"""results/trl_gkd.py, the study's trl-gkd arm: TRL's GKDTrainer fed kd-train's examples in
kd-train's order, with the config's optimizer and schedule, writing the study's rows."""

import csv
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from transformers import TrainerCallback, get_scheduler

from kd_lightning import losses

pytest.importorskip("trl.experimental.gkd")
sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
import trl_gkd  # noqa: E402
from study import COLUMNS  # noqa: E402

#: two steps of a tiny teacher and student; every batch sampled by the student (λ = 1), 8 new tokens
TINY = ["model=tiny", "~model.student.layers", "trainer.max_steps=2", "data.max_train_examples=16", "data.max_length=1024",
        "policy.lambda=1.0", "callbacks.student_responses.max_new_tokens=8"]


class RecordsSeen(L.LightningModule):
    """Keeps the record ids of every training batch Lightning gives it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.records = []

    def training_step(self, batch, batch_idx):
        self.records.append(batch["record"].tolist())
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_kd_train_order_is_the_order_lightning_trains_in_across_epochs(datamodule):
    epoch = len(datamodule.train_set) // datamodule.batch_size  # batches per epoch, all full
    steps = epoch + 2  # into the second epoch
    order = trl_gkd.kd_train_order(datamodule, steps)
    module = RecordsSeen()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert module.records == order
    assert order[epoch] != order[0]  # the second epoch is reshuffled, not repeated


def test_an_epochs_short_last_batch_is_refused(tokenizer, records):
    from kd_lightning import InstructionDataModule

    data = InstructionDataModule(tokenizer, dataset=records, max_length=256, val_size=5, batch_size=4)  # 19 to train
    data.setup()
    with pytest.raises(ValueError, match="fewer than 4 examples"):
        trl_gkd.kd_train_order(data, 5)


def test_trls_loss_is_kd_lightnings_jsd_at_tau_1_and_another_tau_is_refused():
    """TRL 1.16's compute_loss calls generalized_jsd_loss at its default τ = 1: the gkd arm's loss."""
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.tensor([[-100, 4, 5], [1, 2, -100]])
    trl_loss = trl_gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.5)
    kd_lightning_jsd = losses.get("jsd", beta=0.5)(student, teacher, 1.0)[labels != -100].mean()  # the gkd arm's
    assert trl_loss.item() == pytest.approx(kd_lightning_jsd.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        trl_gkd.gkd_config(trl_gkd.arm_config(0, [*TINY, "temperature=0.9"]), Path("unused"), save_steps=1)


class Stop(Exception):
    pass


class StopAfterFirstStep(TrainerCallback):
    """Stops the first training after its first step (and its checkpoint); keeps the step each training began at."""

    def __init__(self, began: list[int]):
        self.began = began

    def on_train_begin(self, args, state, control, **kwargs):
        self.began.append(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1 and self.began == [0]:
            raise Stop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny seed trained by ``train_seed`` (evaluation stood in for), stopped after its first
    step and resumed from its checkpoint: its trainer, data module, composed config, rows file,
    training log and the steps its two trainings began at."""
    built, build, began = {}, trl_gkd.study_trainer, []

    def keep(*args):
        built["trainer"], built["data"] = build(*args)
        built["trainer"].add_callback(StopAfterFirstStep(began))
        return built["trainer"], built["data"]

    root = tmp_path_factory.mktemp("trl_gkd")
    args = Namespace(runs=root / "runs", cache=root / "cache", rows=root / "rows", prompts=1, seeds=[1],
                     overrides=TINY, save_steps=1)
    args.rows.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trl_gkd, "study_trainer", keep)
        patch.setattr(trl_gkd, "evaluate_model", lambda model, tokenizer, cache, prompts: [("nll", "dolly-test", 4.5)])
        with pytest.raises(Stop):
            trl_gkd.train_seed(1, args)
        out = trl_gkd.train_seed(1, args)
    log = list(csv.DictReader((args.rows / "logs" / out.name).open()))
    machines = (args.rows / "logs" / f"{out.stem}.{trl_gkd.MACHINES}").read_text().splitlines()
    return SimpleNamespace(**built, cfg=trl_gkd.arm_config(1, TINY), out=out, log=log, began=began, machines=machines,
                           checkpoints=list((args.runs / out.stem).glob("checkpoint-*")))


def test_a_stopped_run_resumes_from_its_checkpoint_and_cleans_up(trained):
    assert trained.began == [0, 1]  # the second training began after the first step
    assert [int(row["step"]) for row in trained.log] == [1, 2] and trained.checkpoints == []
    assert [line.split(" on ")[0].split()[-1] for line in trained.machines] == ["started", "resumed"]


def test_trl_sees_kd_trains_examples_in_kd_trains_order_as_kd_lightning_tokenised_them(trained):
    cfg = trained.cfg
    fresh = instantiate(cfg.data, tokenizer=instantiate(cfg.model.tokenizer))
    fresh.setup()
    order = trl_gkd.kd_train_order(fresh, cfg.trainer.max_steps)
    seen = trained.trainer.data_collator.records
    assert seen == [record for batch in order for record in batch]
    tokens = {example["record"]: example["input_ids"] for example in trained.data.train_set}
    assert [row["input_ids"] for row in trained.trainer.train_dataset] == [tokens[record] for record in seen]
    assert [row["records"].split() for row in trained.log] == [[str(record) for record in batch] for batch in order]


def test_the_optimizer_and_schedule_are_the_configs(trained):
    cfg, trainer = trained.cfg, trained.trainer
    optimizer = trainer.optimizer.optimizer
    reference = instantiate(cfg.module.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer) is torch.optim.AdamW
    settings = ("betas", "eps", "weight_decay", "amsgrad")  # per group: torch's defaults are not what a group uses
    for group in optimizer.param_groups:
        assert {key: group[key] for key in settings} == {key: reference.defaults[key] for key in settings}
        assert group["initial_lr"] == cfg.module.optimizer.lr
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(trainer.model.parameters()))
    steps = cfg.trainer.max_steps  # kd_lightning's schedule: round(warmup_ratio × steps) warm-up steps
    schedule = get_scheduler(cfg.module.lr_scheduler, reference, round(cfg.module.warmup_ratio * steps), steps)
    expected_lrs = []
    for _ in range(steps):
        expected_lrs.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert [float(row["learning_rate"]) for row in trained.log] == pytest.approx(expected_lrs, rel=1e-6)
    assert (trainer.args.max_grad_norm, trainer.args.per_device_train_batch_size) == (cfg.trainer.gradient_clip_val, 4)
    assert (trainer.args.gradient_accumulation_steps, trainer.args.activation_checkpointing) == (1, False)
    sampling = (trainer.lmbda, trainer.generation_config.temperature, trainer.generation_config.max_new_tokens)
    assert sampling == (1.0, 0.9, 8) and trainer.beta == 0.5


def test_the_rows_are_the_studys_and_name_the_trl_policy(trained):
    rows = list(csv.DictReader(trained.out.open()))
    assert trained.out.name == "trl-gkd-seed1.csv" and tuple(rows[0]) == COLUMNS
    assert {(row["policy"], row["divergence"], row["temperature"], row["seed"], row["examples"]) for row in rows} == {
        ("trl-gkd", "jsd", "1", "1", "8")}
    assert [row["metric"] for row in rows] == ["nll", "train_seconds"] and float(rows[1]["value"]) > 0
