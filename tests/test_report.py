"""kd-report: figures and a self-contained page from the runs' metrics.csv files."""

import sys

import pandas as pd
import pytest
import yaml

from kd_lightning.report import find_runs, main, summary, write_report


def write_run(directory, divergence, temperature, seed=0, validated=True):
    """A run directory as kd-train leaves it: .hydra/config.yaml and metrics.csv."""
    (directory / ".hydra").mkdir(parents=True)
    config = {"divergence": {"name": divergence}, "temperature": temperature, "seed": seed}
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": step, "train/loss": 3.0 - 0.1 * step * temperature, "train/ce_loss": 5.0 - 0.1 * step} for step in range(4)]
    if validated:
        rows.append({"step": 3, "val/loss": 2.0 / temperature, "val/ce_loss": 4.0 + temperature, "eval/rougeL/dolly-test": 10 * temperature})
    pd.DataFrame(rows).to_csv(directory / "metrics.csv", index=False)


@pytest.fixture
def sweep(tmp_path):
    for number, (divergence, temperature) in enumerate([("fkl", 1), ("fkl", 2), ("rkl", 1), ("rkl", 2)]):
        write_run(tmp_path / "sweep" / f"{number}_divergence={divergence},temperature={temperature}", divergence, temperature)
    return tmp_path / "sweep"


def test_a_sweep_gives_curves_final_values_against_tau_and_one_page(sweep):
    written = write_report(sweep)
    assert [path.name for path in written] == ["loss_curves.png", "final_vs_tau.png", "report.html"]
    page = (sweep / "report" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 and "src='http" not in page  # self-contained
    table = summary(find_runs(sweep))
    assert table.set_index("run").loc["rkl τ=2", ["val/loss", "val/ce_loss", "eval/rougeL/dolly-test"]].tolist() == [1.0, 6.0, 20.0]


def test_one_run_gives_its_curves(tmp_path, capsys):
    write_run(tmp_path / "run", "fkl", 1, validated=False)
    main([str(tmp_path / "run"), "--out", str(tmp_path / "figures")])
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == ["loss_curves.png", "report.html"]
    assert str(tmp_path / "figures" / "report.html") in capsys.readouterr().out


def test_runs_without_validation_are_compared_by_their_final_training_losses(tmp_path):
    for temperature in (1, 2):
        write_run(tmp_path / "sweep" / f"{temperature}_temperature={temperature}", "fkl", temperature, validated=False)
    assert (tmp_path / "sweep" / "report" / "final_vs_tau.png") in write_report(tmp_path / "sweep")
    assert "final training losses (no run reached a validation)" in (tmp_path / "sweep" / "report" / "report.html").read_text()


def test_a_directory_without_metrics_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"no metrics.csv under {tmp_path}" in capsys.readouterr().err


def test_without_matplotlib_the_extra_to_install_is_named(sweep, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        main([str(sweep)])
    assert 'pip install "kd_lightning[report]"' in capsys.readouterr().err
