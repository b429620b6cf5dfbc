"""ROUGE-L evaluation by generation: the metric, kd-eval, the periodic callback."""

import csv

import pytest

from kd_lightning.evaluation import eval_records, main, rouge_l
from kd_lightning.train import fit
from test_train import TINY, compose_config, save_run_config


def test_rouge_l_of_known_pairs():
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    assert rouge_l("identical words", "identical words") == 100
    assert rouge_l("nothing shared", "other tokens") == 0
    assert rouge_l("cats running", "cat runs") == 100  # Porter stemming


def test_shipped_evaluation_sets():
    assert [len(eval_records(name)) for name in ("dolly-test", "self-inst", "vicuna")] == [1000, 242, 80]
    assert len(eval_records("vicuna", 3)) == 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(out, *TINY, "callbacks=rouge", "callbacks.rouge_evaluation.every_n_steps=2",
                         "callbacks.rouge_evaluation.num_examples=2", "callbacks.rouge_evaluation.max_new_tokens=4")
    fit(cfg)
    save_run_config(cfg, out)
    return out


def test_kd_eval_on_a_tiny_run(tiny_run, capsys):
    main([str(tiny_run), "--num-examples", "3", "--datasets", "dolly-test", "vicuna", "--seeds", "1", "2", "--max-new-tokens", "8"])
    main([str(tiny_run / "checkpoints" / "last.ckpt"), "--role", "teacher", "--num-examples", "3", "--datasets", "vicuna", "--greedy"])
    main([str(tiny_run), "--role", "student-init", "--num-examples", "3", "--datasets", "vicuna", "--greedy"])
    rows = list(csv.DictReader((tiny_run / "rouge.csv").open()))
    assert [(row["divergence"], row["temperature"], row["dataset"], row["decoding"]) for row in rows] == [
        ("fkl", "1.0", "dolly-test", "sampling seed 1"), ("fkl", "1.0", "dolly-test", "sampling seed 2"),
        ("fkl", "1.0", "vicuna", "sampling seed 1"), ("fkl", "1.0", "vicuna", "sampling seed 2"),
        ("teacher", "", "vicuna", "greedy"), ("student-init", "", "vicuna", "greedy"),
    ]
    assert all(row["seed"] == "0" and row["selection"] == "none" and 0 <= float(row["rouge_l"]) <= 100 for row in rows)
    assert "ROUGE-L" in capsys.readouterr().out


def test_callback_logs_rouge_per_set(tiny_run):
    header = (tiny_run / "metrics.csv").read_text().splitlines()[0]
    for name in ("dolly-test", "self-inst", "vicuna"):
        assert f"eval/rougeL/{name}" in header


def test_kd_eval_names_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"kd-eval: error: FileNotFoundError: no run configuration at {tmp_path}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no run configuration"):  # --debug: the exception itself
        main([str(tmp_path), "--debug"])
