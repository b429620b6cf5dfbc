"""Interrupted runs: SIGKILL and resume from the command line, atomic checkpoints, clean errors.

The tiny training set of these runs has 5 batches of 4 per epoch (max_train_examples=28:
the prompts of 8 examples are longer than the tiny model's 384 bytes), so the steps of
epoch e are 5e … 5e + 4 and validation every 6 steps checkpoints in mid-epoch.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.checkpoints import AtomicCheckpointIO, CheckpointWriteError

TESTS = Path(__file__).parent
TINY = [
    "model=tiny", "data.max_train_examples=28", "trainer.max_steps=15", "trainer.enable_progress_bar=false",
    "logger=none",
]
MIXED = ["policy=mixed", "policy.lambda=0.5", "callbacks.student_responses.max_new_tokens=16"]


def kd_train(*args):
    """``kd-train ARGS`` in its own process, which the fault_injection callbacks may kill."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "kd_lightning.train", *args], capture_output=True, text=True, timeout=600, env=env
    )


def checkpoint(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)  # a resume loads it so too


def assert_same_student(first: Path, second: Path) -> None:
    expected, actual = checkpoint(first), checkpoint(second)
    assert expected["global_step"] == actual["global_step"]
    for key, weight in expected["state_dict"].items():
        assert torch.equal(weight, actual["state_dict"][key]), key  # bit for bit
    assert expected["callbacks"].get("LossAdaptiveTokenFocusing") == actual["callbacks"].get("LossAdaptiveTokenFocusing")
    for moments, moments_again in zip(*(c["optimizer_states"][0]["state"].values() for c in (expected, actual))):
        assert all(torch.equal(moments[name], moments_again[name]) for name in moments)


def killed(run: Path, overrides: list[str], *kill: str) -> dict:
    """Run until a fault_injection callback SIGKILLs the process; the last.ckpt it leaves."""
    process = kd_train(*overrides, *kill, f"hydra.run.dir={run}")
    assert process.returncode == -9, process.stderr[-3000:]  # died of SIGKILL
    return checkpoint(run)


def resumed(run: Path, overrides: list[str]) -> None:
    process = kd_train(*overrides, "ckpt_path=last", f"hydra.run.dir={run}")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Restored all states" in process.stdout + process.stderr


def position(state: dict) -> tuple[int, int, bool]:
    """(step, batches done in the epoch, whether that was the epoch's last batch)."""
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    return state["global_step"], progress["current"]["completed"], progress["is_last_batch"]


def test_a_kill_during_a_checkpoint_write_resumes_exactly(tmp_path):
    """AdaKD, checkpoints at steps 6 (mid-epoch 1) and 12: the process dies while writing
    the step-12 last.ckpt; the step-6 one is intact and the resumed run, which crosses the
    boundary into epoch 2 again, ends with the uninterrupted run's student, bit for bit."""
    overrides = [*TINY, "selection=adakd", "trainer.val_check_interval=6"]
    reference = kd_train(*overrides, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "interrupted"
    kill = ["+callbacks.kill._target_=fault_injection.KillWhileSaving", "+callbacks.kill.step=12", "+callbacks.kill.nth=2"]
    assert position(killed(run, overrides, *kill)) == (6, 1, False)  # the previous last.ckpt, whole: mid-epoch 1
    assert (run / "checkpoints" / "last.ckpt.partial").is_file()  # the write that was cut short
    resumed(run, overrides)
    assert not (run / "checkpoints" / "last.ckpt.partial").exists()
    assert_same_student(tmp_path / "reference", run)


def test_mixed_policy_killed_after_an_epoch_end_checkpoint_resumes_exactly(tmp_path):
    """DistiLLM's mixed policy (the student samples half of the batches; replay buffer):
    checkpoint at step 10, the end of epoch 1, SIGKILL before step 13."""
    overrides = [*TINY, *MIXED, "trainer.val_check_interval=5"]
    reference = kd_train(*overrides, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "interrupted"
    kill = ["+callbacks.kill._target_=fault_injection.KillAtStep", "+callbacks.kill.step=12"]
    stopped = killed(run, overrides, *kill)
    assert position(stopped) == (10, 5, True)  # the end of epoch 1
    resumed(run, overrides)
    assert_same_student(tmp_path / "reference", run)
    training_time = [state["callbacks"]["Timer"]["time_elapsed"]["train"] for state in (stopped, checkpoint(run))]
    assert 0 < training_time[0] < training_time[1]  # the resumed run counts on from the stopped one's time
    expected, actual = (checkpoint(path)["callbacks"]["StudentResponses"] for path in (tmp_path / "reference", run))
    assert len(expected["buffer"]) > 0 and len(expected["buffer"]) == len(actual["buffer"])
    for (prompt, response), (prompt_again, response_again) in zip(expected["buffer"], actual["buffer"]):
        assert torch.equal(prompt, prompt_again) and torch.equal(response, response_again)


def test_checkpoints_by_time_between_validations(tmp_path):
    """checkpoint.every_minutes: last.ckpt after every step that ends that long after the
    previous save, though validation comes only every 50 steps."""
    overrides = ["model=tiny", "trainer.val_check_interval=50", "checkpoint.every_minutes=1e-6", "logger=none"]
    kill = ["+callbacks.kill._target_=fault_injection.KillAtStep", "+callbacks.kill.step=3"]
    assert killed(tmp_path, overrides, *kill)["global_step"] == 3


@pytest.mark.slow
def test_the_issue_run_killed_after_step_50_resumes_exactly(tmp_path):
    """`kd-train model=tiny selection=adakd trainer.max_steps=100 trainer.val_check_interval=10`,
    SIGKILLed just after its step-50 checkpoint and resumed to step 100."""
    overrides = ["model=tiny", "selection=adakd", "trainer.max_steps=100", "trainer.val_check_interval=10", "logger=none"]
    reference = kd_train(*overrides, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "interrupted"
    kill = ["+callbacks.kill._target_=fault_injection.KillAtStep", "+callbacks.kill.step=50"]
    assert killed(run, overrides, *kill)["global_step"] == 50
    resumed(run, overrides)
    assert_same_student(tmp_path / "reference", run)


@pytest.mark.slow
def test_ddp_run_killed_and_resumed_is_exact(tmp_path):
    """Two processes (DDP over gloo; 3 batches per process and epoch), AdaKD and the mixed
    policy: every process's sampler position and random state resume."""
    overrides = [*TINY, *MIXED, "selection=adakd", "trainer=ddp", "trainer.devices=2", "trainer.val_check_interval=5"]
    reference = kd_train(*overrides, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "interrupted"
    kill = ["+callbacks.kill._target_=fault_injection.KillAtStep", "+callbacks.kill.step=8"]
    process = kd_train(*overrides, *kill, f"hydra.run.dir={run}")
    assert process.returncode != 0  # the spawning process reports its children's deaths
    assert position(checkpoint(run)) == (5, 2, False)  # mid-epoch 1; the kill came in epoch 2
    resumed(run, overrides)
    assert_same_student(tmp_path / "reference", run)


def test_a_full_disk_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "weight": torch.ones(3)}, path)

    def fills_the_disk(obj, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointWriteError, match=f"could not write the checkpoint {path} .*No space left on device.*intact"):
        io.save_checkpoint({"global_step": 2, "weight": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1 and os.listdir(tmp_path) == ["last.ckpt"]


def test_an_unwritable_checkpoint_directory_stops_kd_train_with_the_path(tmp_path):
    """No traceback: the error names the checkpoint, and the run ends with exit status 1."""
    (tmp_path / "checkpoints").write_text("a file where the checkpoint directory should be")
    run = kd_train("model=tiny", "trainer.max_steps=1", "logger=none", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 1
    assert f"kd-train: error: CheckpointWriteError: could not write the checkpoint {tmp_path}/checkpoints/" in run.stderr
    assert "Traceback" not in run.stderr


def test_kd_eval_and_kd_export_name_a_missing_path(tmp_path, capsys):
    from kd_lightning import evaluation, export

    for main in (evaluation.main, export.main):
        with pytest.raises(SystemExit) as stopped:
            main([str(tmp_path / "missing"), *([str(tmp_path / "out")] if main is export.main else [])])
        assert stopped.value.code == 1
        error = capsys.readouterr().err
        assert f"error: FileNotFoundError: {tmp_path / 'missing'} does not exist" in error and "Traceback" not in error


def test_kd_export_names_the_group_an_older_run_lacks(tmp_path, capsys):
    from omegaconf import OmegaConf

    from kd_lightning import export
    from test_train import compose_config

    cfg = compose_config(tmp_path, "model=tiny")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save({key: value for key, value in cfg.items() if key not in ("hydra", "policy")}, tmp_path / ".hydra" / "config.yaml")
    with pytest.raises(SystemExit):
        export.main([str(tmp_path), str(tmp_path / "out")])
    assert "config.yaml has no policy config group: the run was written by an older kd_lightning" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no policy config group"):
        export.main([str(tmp_path), str(tmp_path / "out"), "--debug"])
