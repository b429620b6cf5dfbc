"""Checkpoints are read without running what is stored in them, unless trusted on purpose."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning import evaluation, export
from kd_lightning.checkpoints import AtomicCheckpointIO
from kd_lightning.safe_checkpoints import UntrustedCheckpointError, check_checkpoint, load_checkpoint
from kd_lightning.strategies import SpawnedModelParallelStrategy
from test_train import compose_config


class CreatesAFile:
    """Unpickled, it creates the file ``path``: a stand-in for any code a checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def malicious_checkpoint(path, marker):
    torch.save({"state_dict": {}, "hyper_parameters": {"note": CreatesAFile(marker)}}, path)
    return path


@pytest.fixture
def malicious_run(tmp_path):
    """A kd-train run directory of the tiny models whose last checkpoint would create ``MARKER``."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    cfg = compose_config(run, "model=tiny")
    OmegaConf.save({key: value for key, value in cfg.items() if key != "hydra"}, run / ".hydra" / "config.yaml", resolve=True)
    malicious_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "MARKER")
    return run


@pytest.mark.parametrize("command", ["kd-eval", "kd-export"])
def test_kd_eval_and_kd_export_refuse_a_checkpoint_that_would_run_code(command, malicious_run, capsys):
    marker = malicious_run.parent / "MARKER"
    argv = [str(malicious_run)] if command == "kd-eval" else [str(malicious_run), str(malicious_run.parent / "out")]
    main = evaluation.main if command == "kd-eval" else export.main
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--greedy", "--num-examples", "1"] if command == "kd-eval" else argv)
    assert exit.value.code != 0
    error = capsys.readouterr().err
    assert str(malicious_run / "checkpoints" / "last.ckpt") in error
    assert "io.open" in error and "--trust-checkpoint" in error
    assert not marker.exists()
    # the payload is real: trusted on purpose, the checkpoint runs it
    with pytest.raises(SystemExit):
        main([*argv, "--trust-checkpoint"])
    assert marker.exists()


def test_a_resumed_run_reads_its_checkpoint_restricted(tmp_path):
    checkpoint = malicious_checkpoint(tmp_path / "last.ckpt", tmp_path / "MARKER")
    with pytest.raises(UntrustedCheckpointError, match="refused to load the checkpoint .*last.ckpt.*trust_checkpoint=true"):
        AtomicCheckpointIO().load_checkpoint(checkpoint)
    assert not (tmp_path / "MARKER").exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "loops": {"step": 3}}, tmp_path / "plain.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "plain.ckpt")["loops"] == {"step": 3}


def test_kd_train_passes_trust_checkpoint_to_what_resumes(tmp_path):
    for trust in (False, True):
        cfg = compose_config(tmp_path, "model=tiny", f"trust_checkpoint={str(trust).lower()}")
        assert instantiate(cfg.trainer.plugins[0]).trust_checkpoint is trust
        fsdp = compose_config(tmp_path, "model=tiny", "trainer=fsdp", f"trust_checkpoint={str(trust).lower()}")
        assert instantiate(fsdp.trainer.strategy).trust_checkpoint is trust


def test_a_distributed_checkpoint_index_is_read_restricted(tmp_path):
    import pickle

    directory = tmp_path / "last.ckpt"
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps(CreatesAFile(tmp_path / "MARKER")))
    with pytest.raises(UntrustedCheckpointError, match=r"\.metadata: it holds a reference to io.open"):
        check_checkpoint(directory)
    strategy = SpawnedModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    with pytest.raises(UntrustedCheckpointError):
        strategy.load_checkpoint(directory)
    assert not (tmp_path / "MARKER").exists()


def test_weights_and_plain_values_load_restricted(tmp_path):
    state = {"state_dict": {"student.w": torch.randn(3, dtype=torch.bfloat16)}, "epoch": 1, "name": "x", "steps": [1, 2]}
    torch.save(state, tmp_path / "ok.ckpt")
    loaded = load_checkpoint(tmp_path / "ok.ckpt")
    assert torch.equal(loaded["state_dict"]["student.w"], state["state_dict"]["student.w"]) and loaded["steps"] == [1, 2]
