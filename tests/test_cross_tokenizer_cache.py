"""A teacher cache of the teacher's own tokens: ``kd-cache`` with ``cross_tokenizer`` stores
the teacher's states on its tokenisation, ``kd-train`` reads them back at the groups'
positions and gives the live teacher's losses; a top-k cache cannot serve these objectives."""

import json

import pandas as pd
import pytest

from kd_lightning import cache_build
from kd_lightning.train import fit
from test_cross_tokenizer_training import cross_dirs, cross_overrides  # noqa: F401 (cross_dirs is a fixture)
from test_train import compose_config


def test_kd_cache_of_the_teachers_tokens_gives_the_live_losses(cross_dirs, tmp_path):
    overrides = cross_overrides(cross_dirs, tmp_path, "hybrid", "module.ce_weight=0.2", "temperature=2")
    cache = cache_build.build(compose_config(tmp_path / "build", *overrides, f"teacher_cache={tmp_path / 'cache'}"))
    assert json.loads((cache / "fingerprint.json").read_text())["tokenizer"] != ""
    runs = {}
    for name, extra in (("live", []), ("cached", [f"teacher_cache={cache}"])):
        fit(compose_config(tmp_path / name, *overrides, *extra))
        runs[name] = pd.read_csv(tmp_path / name / "metrics.csv")
    columns = ["train/kd_loss", "train/ce_loss", "val/kd_loss"]
    pd.testing.assert_frame_equal(runs["cached"][columns], runs["live"][columns], rtol=1e-6)


def test_a_top_k_cache_is_refused_to_a_cross_tokenizer_run(cross_dirs, tmp_path):
    message = r"cross_tokenizer=uld cannot train from a topk teacher cache.*cache.format=exact"
    overrides = cross_overrides(cross_dirs, tmp_path, "uld", f"teacher_cache={tmp_path / 'cache'}")
    with pytest.raises(ValueError, match=message):
        cache_build.build(compose_config(tmp_path / "build", *overrides, "cache.format=topk", "cache.top_k=8"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fingerprint.json").write_text(json.dumps({"format": "topk", "top_k": 8}))
    with pytest.raises(ValueError, match=message):
        fit(compose_config(tmp_path / "run", *overrides))
