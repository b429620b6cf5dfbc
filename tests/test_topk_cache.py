"""The top-k teacher cache: kd-cache cache.format=topk writes it, kd-train reads it without a teacher lm_head."""

import copy
import json
import re

import pandas as pd
import pytest
import torch

from kd_lightning import DistillationModule
from kd_lightning.cache import CachedTeacher, CacheError, open_cache
from kd_lightning.models import copy_layers, lm_head
from kd_lightning.topk_cache import TopKCachedTeacher, TopKCacheWriter
from test_cache import FINGERPRINT, TINY_RUN, kd, teacher, tiny_cache, write_cache  # noqa: F401 (fixtures)


def write_topk_cache(directory, teacher, datamodule, top_k, dtype="float16"):
    vocab_size = lm_head(teacher).weight.shape[0]
    writer = TopKCacheWriter(directory, {**FINGERPRINT, "dtype": dtype, "format": "topk", "top_k": top_k}, vocab_size)
    splits = {"train": datamodule.train_set, "validation": datamodule.val_set}
    return writer.write(teacher, splits, datamodule.collate, batch_size=3, device=torch.device("cpu"))


def losses_and_gradients(teacher_source, student, batch, **module_settings):
    module = DistillationModule(student=student, teacher=teacher_source, **module_settings)
    module.training_step(batch, 0)["loss"].backward()
    return module.training_step(batch, 0)["loss"].detach(), [p.grad for p in module.student.parameters()]


@pytest.mark.parametrize("divergence, temperature", [("fkl", 1.0), ("csd", 1.5)])
def test_with_k_equal_to_v_the_topk_cache_gives_the_exact_caches_loss(divergence, temperature, teacher, datamodule, tmp_path):
    vocab_size = lm_head(teacher).weight.shape[0]
    write_cache(tmp_path / "exact", teacher, datamodule)
    write_topk_cache(tmp_path / "topk", teacher, datamodule, top_k=vocab_size, dtype="float32")
    student = copy_layers(teacher, every=2)
    settings = {"divergence": divergence, "temperature": temperature, "ce_weight": 0.2}
    for batch in list(datamodule.train_dataloader())[:2]:
        exact = losses_and_gradients(CachedTeacher(tmp_path / "exact"), copy.deepcopy(student), batch, **settings)
        topk = losses_and_gradients(TopKCachedTeacher(tmp_path / "topk"), copy.deepcopy(student), batch, **settings)
        torch.testing.assert_close(topk[0], exact[0], rtol=1e-6, atol=1e-7)
        for topk_grad, exact_grad in zip(topk[1], exact[1]):
            torch.testing.assert_close(topk_grad, exact_grad, rtol=1e-4, atol=1e-6)


def test_a_small_k_is_a_few_bytes_per_token_and_has_no_lm_head(teacher, datamodule, tmp_path):
    exact, topk = write_cache(tmp_path / "exact", teacher, datamodule), write_topk_cache(tmp_path / "topk", teacher, datamodule, 8)
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / name / "shards").iterdir()) for name in ("exact", "topk")}
    assert sizes["topk"] < 0.5 * sizes["exact"]  # 16 + 16 + 4 bytes a token against 32 × 4
    assert not (tmp_path / "topk" / "lm_head.safetensors").exists()
    assert topk["top_k"] == 8 and "hidden_size" in exact
    source = open_cache(tmp_path / "topk")
    assert isinstance(source, TopKCachedTeacher) and not list(source.parameters())


def test_a_build_of_another_format_into_a_cache_is_refused(teacher, datamodule, tmp_path):
    write_cache(tmp_path / "cache", teacher, datamodule)
    with pytest.raises(CacheError, match="built with another format"):
        write_topk_cache(tmp_path / "cache", teacher, datamodule, 8)
    write_topk_cache(tmp_path / "topk", teacher, datamodule, 8)
    with pytest.raises(CacheError, match="built with another top_k"):
        write_topk_cache(tmp_path / "topk", teacher, datamodule, 16)


@pytest.fixture(scope="module")
def tiny_topk_cache(tmp_path_factory):
    """``kd-cache cache.format=topk cache.top_k=8`` of the tiny model's examples."""
    directory = tmp_path_factory.mktemp("tiny_topk_cache")
    overrides = [f"teacher_cache={directory / 'cache'}", "cache.format=topk", "cache.top_k=8"]
    built = kd("cache_build", *TINY_RUN, *overrides, f"hydra.run.dir={directory / 'build'}", cwd=directory)
    assert built.returncode == 0, built.stderr[-2000:]
    return directory / "cache"


def test_kd_cache_topk_then_kd_train_with_every_option(tiny_topk_cache, tmp_path, capsys):
    """τ schedules, AdaKD and the cross-entropy term run from a top-k cache; the loss is close
    to the exact cache's (K = 8 of a 256-id vocabulary of a random teacher: a loose check).
    Trained in this process; the kd-train command line is test_train's part."""
    from test_train import compose_config

    from kd_lightning.train import fit

    manifest = json.loads((tiny_topk_cache / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["id_bits"] == 9
    extra = ["selection=adakd", "temperature=2", "temperature_schedule=linear", "temperature_end=1", "module.ce_weight=0.3"]
    fit(compose_config(tmp_path, *TINY_RUN, *extra, f"teacher_cache={tiny_topk_cache}"))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["train/kd_loss"].notna().sum() == 4 and metrics["val/kd_loss"].notna().any()
    assert "holds 0.0 MiB of teacher" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cache.format=topk", "cache.top_k=0"], "cache.top_k must be a whole number >= 1, got 0"),
        (["cache.format=topk", "cache.top_k=300"], "cache.top_k=300 exceeds the teacher's vocabulary of 259 ids"),
        (["cache.format=top5"], "cache.format must be one of exact, topk, got 'top5'"),
    ],
)
def test_bad_topk_settings_are_refused_naming_the_key(overrides, message, tmp_path):
    from test_train import compose_config

    from kd_lightning.cache_build import build

    cfg = compose_config(tmp_path, *TINY_RUN, *overrides, f"teacher_cache={tmp_path / 'cache'}")
    with pytest.raises(ValueError, match=re.escape(message)):
        build(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [(["policy=on_policy"], "which the teacher must score live"), (["divergence=csd", "divergence.weighting=us"], "weighting=us")],
)
def test_a_topk_cache_refuses_what_it_cannot_serve(overrides, message, tiny_topk_cache, tmp_path):
    from test_train import compose_config

    from kd_lightning.train import fit

    cfg = compose_config(tmp_path, *TINY_RUN, *overrides, f"teacher_cache={tiny_topk_cache}", "logger=none")
    with pytest.raises(ValueError, match=message):
        fit(cfg)
