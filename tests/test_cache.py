"""The teacher cache: kd-cache writes the teacher's final hidden states, kd-train reads them."""

import copy
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from kd_lightning import DistillationModule, InstructionDataModule, cache, cache_build
from kd_lightning.cache import CachedTeacher, CacheError, TeacherCacheWriter
from kd_lightning.callbacks import InverseDifficultyTemperature, LossAdaptiveTokenFocusing
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.models import copy_layers, tiny_causal_lm

FINGERPRINT = {"teacher": "tiny", "teacher_files": {}, "tokenizer": "t", "data": "d", "max_length": 256, "template": "p"}


def write_cache(directory, teacher, datamodule, dtype="float32"):
    writer = TeacherCacheWriter(directory, {**FINGERPRINT, "dtype": dtype})
    splits = {"train": datamodule.train_set, "validation": datamodule.val_set}
    return writer.write(teacher, splits, datamodule.collate, batch_size=3, device=torch.device("cpu"))


@pytest.fixture
def teacher():
    return tiny_causal_lm(num_layers=2, hidden_size=32, initializer_range=0.3, seed=1)


def live_and_cached(teacher, directory, divergence, adakd):
    """Two modules with the same student: one with the live teacher, one with its cache."""
    modules = []
    student = copy_layers(teacher, every=2)
    for source in (teacher, CachedTeacher(directory)):
        module = DistillationModule(student=copy.deepcopy(student), teacher=source, divergence=divergence)
        if adakd:  # LATF below ratio 1 and IDTS: the Hellinger difficulty decides and rescales τ
            focus = LossAdaptiveTokenFocusing(warmup_steps=0)
            focus.ratio = 0.5
            module.token_policies += [focus, InverseDifficultyTemperature()]
        modules.append(module)
    return modules


@pytest.mark.parametrize("divergence, adakd", [("rkl", False), ("csd", True)])
def test_cached_teacher_gives_the_live_loss_and_gradients(divergence, adakd, teacher, datamodule, tmp_path):
    write_cache(tmp_path / "cache", teacher, datamodule)
    live, cached = live_and_cached(teacher, tmp_path / "cache", divergence, adakd)
    for batch in [*datamodule.train_dataloader(), *datamodule.val_dataloader()]:
        for module in (live, cached):
            module.student.zero_grad()
            module.training_step(batch, 0)["loss"].backward()
        live_out, cached_out = live.training_step(batch, 0), cached.training_step(batch, 0)
        # float32 states: equal up to the rounding of the teacher's matmuls, which differs with batch shape
        torch.testing.assert_close(cached_out["loss"], live_out["loss"], rtol=1e-6, atol=1e-7)
        assert torch.equal(cached_out["kept_tokens"], live_out["kept_tokens"])
        for (name, live_param), cached_param in zip(live.student.named_parameters(), cached.student.parameters()):
            torch.testing.assert_close(cached_param.grad, live_param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_live_teacher_states_differ_by_batch_shape_as_much_as_the_cache(teacher, datamodule):
    """Why the float32 cache is compared with a tolerance: the live teacher itself
    gives the same example slightly different states in batches of other shapes."""
    examples = [datamodule.train_set[index] for index in range(4)]
    alone = counted_positions(datamodule.collate(examples[:1])["labels"])
    batched = datamodule.collate(examples)
    from kd_lightning.models import last_hidden_state

    with torch.no_grad():
        one = last_hidden_state(teacher, {k: datamodule.collate(examples[:1])[k] for k in ("input_ids", "attention_mask")})
        many = last_hidden_state(teacher, {k: batched[k] for k in ("input_ids", "attention_mask")})
    # agreeing to float32 rounding only (here up to ~3e-6): bit-equality is not defined by batch composition
    torch.testing.assert_close(many[:1, : one.shape[1]][:, :-1][alone], one[:, :-1][alone], rtol=1e-4, atol=1e-5)


def test_bfloat16_cache_is_half_the_size_and_close(teacher, datamodule, tmp_path):
    write_cache(tmp_path / "fp32", teacher, datamodule)
    write_cache(tmp_path / "bf16", teacher, datamodule, dtype="bfloat16")
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / name / "shards").iterdir()) for name in ("fp32", "bf16")}
    assert sizes["bf16"] < 0.55 * sizes["fp32"]
    live, cached = live_and_cached(teacher, tmp_path / "bf16", "fkl", adakd=False)
    batch = next(iter(datamodule.train_dataloader()))
    # states rounded to 8 mantissa bits: the loss moves by well under 1%
    torch.testing.assert_close(cached.training_step(batch, 0)["loss"], live.training_step(batch, 0)["loss"], rtol=1e-2, atol=0)


def test_interrupted_build_resumes_where_it_stopped(teacher, datamodule, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_EXAMPLES", 4)
    complete = write_cache(tmp_path / "complete", teacher, datamodule)
    real_save = cache.save_file
    calls = {"n": 0}

    def failing_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 4:  # lm_head, two shards, then the interruption
            raise KeyboardInterrupt
        real_save(tensors, path)

    monkeypatch.setattr(cache, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "resumed", teacher, datamodule)
    with pytest.raises(CacheError, match="incomplete .2 shards written, no manifest.*run the same kd-cache command again"):
        CachedTeacher(tmp_path / "resumed")
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "resumed" / "shards").glob("*.safetensors")}
    resumed = write_cache(tmp_path / "resumed", teacher, datamodule)
    assert resumed == complete  # the same shards, byte for byte (sha256)
    for name, mtime in written.items():  # finished shards were kept, not rewritten
        assert (tmp_path / "resumed" / "shards" / name).stat().st_mtime_ns == mtime


def test_missing_corrupt_and_foreign_caches_are_refused(teacher, datamodule, tmp_path):
    with pytest.raises(CacheError, match="no teacher cache at .*build it with kd-cache"):
        CachedTeacher(tmp_path / "nothing")
    write_cache(tmp_path / "cache", teacher, datamodule)
    with pytest.raises(CacheError, match="another max_length .cache: 256, this run: 128"):
        CachedTeacher(tmp_path / "cache", {**FINGERPRINT, "dtype": "float32", "max_length": 128})
    with pytest.raises(CacheError, match="built with another dtype"):
        write_cache(tmp_path / "cache", teacher, datamodule, dtype="bfloat16")
    shard = next((tmp_path / "cache" / "shards").glob("train-*"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(CacheError, match="missing or corrupt"):
        CachedTeacher(tmp_path / "cache")


def test_examples_the_cache_lacks_are_named(teacher, tokenizer, records, tmp_path):
    small = InstructionDataModule(tokenizer, dataset=records, val_size=4, max_train_examples=4, batch_size=4)
    small.setup()
    write_cache(tmp_path / "cache", teacher, small)
    larger = InstructionDataModule(tokenizer, dataset=records, val_size=4, batch_size=24)
    larger.setup()
    _, cached = live_and_cached(teacher, tmp_path / "cache", "fkl", adakd=False)
    with pytest.raises(CacheError, match="example .* is not in the teacher cache.*data.max_train_examples"):
        cached.training_step(next(iter(larger.train_dataloader())), 0)


def test_an_example_tokenised_differently_is_refused(teacher, datamodule, tmp_path):
    write_cache(tmp_path / "cache", teacher, datamodule)
    _, cached = live_and_cached(teacher, tmp_path / "cache", "fkl", adakd=False)
    batch = next(iter(datamodule.train_dataloader()))
    batch["input_ids"][0, 3] += 1  # as another tokenizer or template would
    with pytest.raises(CacheError, match="tokenised differently .* rebuild the cache"):
        cached.training_step(batch, 0)
    del batch["record"]  # a batch from another data module
    with pytest.raises(KeyError, match="a cached teacher needs each batch's 'record'"):
        cached.training_step(batch, 0)


def kd(command, *args, cwd):
    return subprocess.run(
        [sys.executable, "-c", f"from kd_lightning.{command} import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


TINY_RUN = ["model=tiny", "divergence=rkl", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """``kd-cache`` of the tiny model's examples, built once for this file's runs, in this
    process (the kd-cache command line itself: test_topk_cache's tiny_topk_cache)."""
    from test_train import compose_config

    directory = tmp_path_factory.mktemp("tiny_cache")
    return cache_build.build(compose_config(directory / "build", *TINY_RUN, f"teacher_cache={directory / 'cache'}"))


def test_kd_cache_then_kd_train_gives_the_live_losses(tiny_cache, tmp_path, capsys):
    """In this process: what the kd-train command line does is test_train's and test_faults' part."""
    from test_train import compose_config

    from kd_lightning.train import fit

    assert json.loads((tiny_cache / "manifest.json").read_text())["shards"]
    runs = {}
    for name, extra in (("live", []), ("cached", [f"teacher_cache={tiny_cache}"])):
        fit(compose_config(tmp_path / name, *TINY_RUN, *extra))
        runs[name] = pd.read_csv(tmp_path / name / "metrics.csv")
    assert "the cache saves" in capsys.readouterr().out
    columns = ["train/kd_loss", "train/ce_loss", "val/kd_loss"]
    pd.testing.assert_frame_equal(runs["cached"][columns], runs["live"][columns], rtol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_length=200", "built for another max_length"),
        ("policy=on_policy", "which the teacher must score live"),
    ],
)
def test_a_cache_the_run_cannot_use_is_refused(override, message, tiny_cache, tmp_path):
    from test_train import compose_config

    from kd_lightning.train import fit

    cfg = compose_config(tmp_path, *TINY_RUN, override, f"teacher_cache={tiny_cache}", "logger=none")
    with pytest.raises((CacheError, ValueError), match=message):
        fit(cfg)


def test_the_fingerprint_names_the_data_file_and_its_content(tokenizer, tmp_path):
    from test_train import compose_config

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(12)))
    cfg = compose_config(tmp_path, "model=tiny", f"data.path={data}")

    def fingerprint():
        return cache_build.run_fingerprint(cfg, tokenizer, InstructionDataModule(tokenizer, path=data))

    before = fingerprint()
    data.write_text(data.read_text().replace("Say 3.", "Say three."))
    after = fingerprint()
    assert cache.mismatch(before, after) == "data" and before["data"]["file"] == "data.jsonl"


@pytest.mark.slow
def test_two_ddp_processes_read_the_cache(tiny_cache, tmp_path):
    """Slow (two spawned processes). In the default suite, test_kd_cache_then_kd_train_gives_the_live_losses
    reads a cache in one process and test_train's test_ddp_run_and_resume_from_the_command_line
    spawns the two DDP processes; this is the two together."""
    run = kd("train", *TINY_RUN, "trainer=ddp", "trainer.devices=2", f"teacher_cache={tiny_cache}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("the cache saves") == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_cache_being_built_is_refused_to_a_second_builder_and_to_readers(tiny_cache, tmp_path):
    """While a kd-cache holds the directory's lock, another kd-cache and kd-train are refused,
    naming the process that builds it."""
    import os

    from test_train import compose_config

    from kd_lightning.cache_build import build
    from kd_lightning.locking import DirectoryLockedError, directory_lock

    cfg = compose_config(tmp_path, *TINY_RUN, f"teacher_cache={tiny_cache}")
    with directory_lock(tiny_cache, command="kd-cache model=tiny"):
        with pytest.raises(DirectoryLockedError, match=f"being built by .*{os.getpid()}.*Wait for that build to finish"):
            build(cfg)
        with pytest.raises(DirectoryLockedError, match="cannot train from .* being built"):
            CachedTeacher(tiny_cache)
    CachedTeacher(tiny_cache)  # the lock is gone with the build
