"""Sample answers: the teacher's and the student's answers side by side while training."""

from types import SimpleNamespace

import pandas as pd
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from kd_lightning.callbacks import SampleAnswers
from kd_lightning.callbacks.samples import COLUMNS, NO_LIVE_TEACHER
from kd_lightning.models import tiny_causal_lm

SHORT = ("callbacks.sample_answers.num_prompts=2", "callbacks.sample_answers.max_new_tokens=4")


def test_a_run_writes_samples_csv_at_start_every_n_steps_and_end(tmp_path):
    from test_train import TINY, compose_config

    from kd_lightning.train import fit

    cfg = compose_config(
        tmp_path, *TINY, "trainer.max_steps=3", "data.max_train_examples=16", "temperature=2", "callbacks.sample_answers.enabled=true",
        "callbacks.sample_answers.every_n_steps=2", *SHORT,
    )
    fit(cfg)
    samples = pd.read_csv(tmp_path / "samples.csv", keep_default_na=False)
    assert tuple(samples.columns) == COLUMNS
    assert samples.step.tolist() == [0, 0, 2, 2, 3, 3] and set(samples.temperature) == {2.0}
    assert set(samples.decoding) == {"greedy, at most 4 new tokens"}
    assert samples.groupby("prompt").teacher.nunique().eq(1).all()  # the frozen teacher answers once


def the_run(tmp_path, tokenizer, teacher: nn.Module, loggers=(), step=0):
    """A trainer and module as the callback sees them, at ``step``."""
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(tokenizer=tokenizer), global_step=step, is_global_zero=True, loggers=list(loggers)
    )
    module = SimpleNamespace(teacher=teacher, student=tiny_causal_lm(num_layers=1, hidden_size=32, seed=2), temperature=1.5)
    return trainer, module


def test_a_cached_teacher_leaves_the_student_alone_with_a_reason(tmp_path, tokenizer):
    callback = SampleAnswers(tmp_path, num_prompts=2, max_new_tokens=3)
    trainer, module = the_run(tmp_path, tokenizer, teacher=nn.Linear(2, 2))  # a teacher that cannot generate
    callback.on_train_start(trainer, module)
    samples = pd.read_csv(tmp_path / "samples.csv")
    assert len(samples) == 2 and set(samples.teacher) == {NO_LIVE_TEACHER} and set(samples.temperature) == {1.5}


def test_a_resumed_run_replaces_the_rows_from_its_first_step(tmp_path, tokenizer):
    old = pd.DataFrame([{column: step if column == "step" else "x" for column in COLUMNS} for step in (0, 4, 8)])
    old.to_csv(tmp_path / "samples.csv", index=False)
    trainer, module = the_run(tmp_path, tokenizer, teacher=nn.Linear(2, 2), step=4)
    SampleAnswers(tmp_path, num_prompts=1, max_new_tokens=3).on_train_start(trainer, module)
    assert pd.read_csv(tmp_path / "samples.csv").step.tolist() == [0, 4]


class RecordingWandbLogger(WandbLogger):
    """A W&B logger that keeps the tables it is given instead of starting a W&B run."""

    def __init__(self):
        super().__init__(offline=True)
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, [list(row) for row in data], step))


def test_with_wandb_the_rows_go_to_a_table_of_every_row_so_far(tmp_path, tokenizer):
    logger = RecordingWandbLogger()
    callback = SampleAnswers(tmp_path, every_n_steps=1, num_prompts=2, max_new_tokens=3)
    trainer, module = the_run(tmp_path, tokenizer, teacher=tiny_causal_lm(num_layers=1, hidden_size=32, seed=1), loggers=[logger])
    callback.on_train_start(trainer, module)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)
    (key, columns, first, step_0), (_, _, second, step_1) = logger.tables
    assert key == "samples/answers" and columns == list(COLUMNS) and (step_0, step_1) == (0, 1)
    assert len(first) == 2 and second[:2] == first and [row[0] for row in second[2:]] == [1, 1]
    assert not (tmp_path / "samples.csv").exists()
