"""Job directory names of a sweep: flat, with path values by their last component."""

import pytest

from kd_lightning.sweep_dirs import MAX_NAME_BYTES, job_dirname


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["teacher_cache=/tmp/x/caches/dolly", "temperature=1"], "teacher_cache=dolly,temperature=1"),
        (["data.path=data/train.jsonl", "model=tiny"], "data.path=train.jsonl,model=tiny"),
        (["model.teacher_path=/models/teacher/", "export.dir='out dir/student'"], "export.dir=student,model.teacher_path=teacher"),
        (["+experiment/budget=tiny", "divergence=rkl"], "+experiment.budget=tiny,divergence=rkl"),
        (["ckpt_path=/runs/a/checkpoints/last.ckpt", "seed=1"], "seed=1"),
        ([], ""),
    ],
)
def test_job_dirname_has_no_slash_and_drops_excluded_keys(overrides, expected):
    assert job_dirname(overrides, exclude_keys=["ckpt_path"]) == expected


def test_a_name_too_long_keeps_its_shortest_pairs_and_a_hash_of_the_rest():
    settings = [f"callbacks.rouge_evaluation.setting_{number}=value" for number in range(8)]
    name = job_dirname([*settings, "divergence=fkl", "temperature=2"])
    other = job_dirname([*settings, "divergence=fkl", "temperature=4"])
    assert len(name.encode()) <= MAX_NAME_BYTES and name != other
    assert "divergence=fkl,temperature=2," in name and name.rsplit(",", 1)[1].startswith("…")


def test_the_sweep_subdir_uses_the_flat_names(tmp_path):
    from omegaconf import open_dict, read_write
    from test_train import compose_config

    cfg = compose_config(tmp_path, "teacher_cache=/tmp/x/cache", "temperature=2")
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.job.num = 3
    assert cfg.hydra.sweep.subdir == "3_teacher_cache=cache,temperature=2"
