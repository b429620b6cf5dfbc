"""The study driver's bookkeeping: which runs it plans, in which order, and how drivers
sharing one runs directory keep out of each other's way."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "results"))
import study  # noqa: E402
from study import ARMS, COLUMNS, SEEDS, TOP_K, claim, collect, description, plan, training_seconds  # noqa: E402


def test_a_run_held_by_one_driver_is_refused_to_another_until_released(tmp_path):
    with claim(tmp_path / "fkl-tau1-seed0") as first:
        with claim(tmp_path / "fkl-tau1-seed0") as second:
            assert first and not second
    with claim(tmp_path / "fkl-tau1-seed0") as again:
        assert again


def test_the_pilot_comes_first_and_the_core_runs_every_seed_before_the_other_groups():
    runs = [(arm, seed) for arm, seed, _ in plan(["pilot", "core", "temperature"])]
    assert runs[:2] == [("ce", 0), ("pilot-ce-lr5e-4", 0)]
    assert runs.count(("ce", 0)) == 1
    core = [arm for arm, (group, _) in ARMS.items() if group == "core"]
    assert runs[2 : 2 + len(core) * len(SEEDS) - 1] == [
        (arm, seed) for seed in SEEDS for arm in core if (arm, seed) != ("ce", 0)
    ]
    assert {arm for arm, _ in runs[2 + len(core) * len(SEEDS) - 1 :]} == {"fkl-tau4", "rkl-tau4"}


def test_rows_describe_the_arm_as_the_table_columns_expect():
    assert description("rkl-adakd-tau1", 2, 2000) == {
        "divergence": "rkl", "temperature": "1", "selection": "adakd", "policy": "offline",
        "teacher": "SmolLM2-135M-Instruct", "teacher_outputs": "exact", "seed": 2, "examples": 2000,
    }
    cross = description("hybrid-fkl-tau2", 0, 2000, teacher="qwen")
    assert (cross["divergence"], cross["temperature"], cross["teacher"]) == ("hybrid-fkl", "2", "qwen")
    assert description("uld-ce-tau1", 0, 2000, teacher="qwen")["divergence"] == "uld+ce"  # ULD with its authors' CE
    assert description("gold-tau1", 0, 2000, teacher="qwen")["divergence"] == "gold"
    gkd, offline = description("gkd", 0, 2000), description("jsd-tau1", 0, 2000)
    assert (gkd["policy"], gkd["teacher_outputs"], gkd["divergence"], gkd["temperature"]) == ("on_policy", "live", "jsd", "1")
    assert (offline["policy"], offline["teacher_outputs"]) == ("offline", "exact")
    assert description("distillm", 0, 2000)["policy"] == "mixed"
    assert description(f"fkl-top{TOP_K}-tau1", 1, 2000)["teacher_outputs"] == f"top-{TOP_K}"
    assert description("pilot-ce-lr5e-4", 0, 2000)["divergence"] == "ce"
    assert description("teacher", 0, 0) == {
        "divergence": "teacher", "temperature": "", "selection": "none", "policy": "offline",
        "teacher": "SmolLM2-135M-Instruct", "teacher_outputs": "exact", "seed": 0, "examples": 0,
    }


def test_rows_written_before_the_teacher_columns_read_as_the_default_teachers_exact_cache(tmp_path):
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    old_columns = [column for column in COLUMNS if column not in ("policy", "teacher", "teacher_outputs")]
    (rows_dir / "fkl-tau1-seed0.csv").write_text(",".join(old_columns) + "\nfkl,1,none,0,2000,nll,dolly-test,4.5\n")
    collect(rows_dir, tmp_path / "study.csv", "*")
    assert (tmp_path / "study.csv").read_text().splitlines()[1] == "fkl,1,none,offline,SmolLM2-135M-Instruct,exact,0,2000,nll,dolly-test,4.5"


def test_the_cross_group_needs_its_teacher_and_is_left_out_without_it():
    from argparse import Namespace

    from study import group_models

    assert group_models("core", Namespace()) == []
    with pytest.raises(SystemExit, match="--cross-teacher-gguf"):
        group_models("cross", Namespace(cross_teacher_gguf=None))


def test_collect_joins_the_matching_runs_rows_and_writes_no_table_without_any(tmp_path):
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    for name, value in (("fkl-tau1-seed0", "4.5"), ("pilot-ce-lr5e-4", "4.6")):
        row = {**description(name.rsplit("-seed", 1)[0], 0, 2000), "metric": "nll", "dataset": "dolly-test", "value": value}
        (rows_dir / f"{name}.csv").write_text(",".join(COLUMNS) + "\n" + ",".join(str(row[c]) for c in COLUMNS) + "\n")
    collect(rows_dir, tmp_path / "study.csv", "[!p]*")
    assert (tmp_path / "study.csv").read_text().splitlines()[1].endswith(",4.5")
    collect(rows_dir, tmp_path / "none.csv", "teacher*")
    assert not (tmp_path / "none.csv").exists()


def test_training_time_is_read_from_the_runs_last_checkpoint(tmp_path):
    assert training_seconds(tmp_path) is None  # a baseline: no checkpoint
    (tmp_path / "checkpoints").mkdir()
    torch.save({"callbacks": {"RandomState": {}}}, tmp_path / "checkpoints" / "last.ckpt")
    assert training_seconds(tmp_path) is None  # trained before kd-train timed
    torch.save({"callbacks": {"Timer": {"time_elapsed": {"train": 125.5, "validate": 0.0}}}}, tmp_path / "checkpoints" / "last.ckpt")
    assert training_seconds(tmp_path) == 125.5


def test_each_part_of_a_run_records_the_machine_it_trains_on(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(study, "sh", lambda *command: commands.append(command))
    (tmp_path / "checkpoints").mkdir()
    study.train(tmp_path, ["seed=0"], None)
    (tmp_path / "checkpoints" / "done").unlink()
    (tmp_path / "checkpoints" / "last.ckpt").touch()  # stopped: the next part resumes
    study.train(tmp_path, ["seed=0"], None)
    study.train(tmp_path, ["seed=0"], None)  # done: nothing runs, nothing is recorded
    parts = (tmp_path / study.MACHINES).read_text().splitlines()
    assert len(commands) == len(parts) == 2 and "ckpt_path=last" in commands[1]
    assert " started on " in parts[0] and " resumed on " in parts[1]
    assert all(part.endswith(" bf16") and " thread" in part for part in parts)
