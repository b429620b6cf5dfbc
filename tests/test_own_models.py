"""Your own models: model=hf from local directories, students built from teacher layers,
tokenizer checks, LoRA students and their export."""

import json
import subprocess

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers import AutoModelForCausalLM

from kd_lightning.export import main as kd_export
from kd_lightning.models import byte_tokenizer, check_same_tokenizer, copy_layers, decoder_layers, load_student, tiny_causal_lm
from kd_lightning.runs import load_run
from kd_lightning.train import fit
from test_data import RECORDS, write_json_lines
from test_train import TINY, compose_config

SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.val_size=2"]


def hf(teacher, student=None, *overrides):
    return ["model=hf", f"model.teacher_path={teacher}", *([f"model.student_path={student}"] if student else []), *SHORT, *overrides]


@pytest.mark.parametrize("format", ["messages", "prompt/completion"])  # instruction data: every other test
def test_model_hf_trains_each_data_format(format, hf_dirs, tmp_path):
    data = write_json_lines(tmp_path / "data.jsonl", [RECORDS[format]] * 12)
    trainer = fit(compose_config(tmp_path / "run", *hf(*hf_dirs, f"data.path={data}")))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_save_to_disk_directory_trains(hf_dirs, tmp_path):
    from datasets import Dataset

    Dataset.from_list([RECORDS["messages"]] * 12).save_to_disk(tmp_path / "chats")
    assert fit(compose_config(tmp_path / "run", *hf(*hf_dirs, f"data.path={tmp_path / 'chats'}"))).global_step == 2


def test_kd_train_command_line_on_chat_data_and_a_broken_line(hf_dirs, tmp_path):
    """The issue's acceptance runs: kd-train on a messages file; a broken second line stops it."""
    chat = write_json_lines(tmp_path / "chat.jsonl", [RECORDS["messages"]] * 12)
    run = subprocess.run(
        ["kd-train", *hf(*hf_dirs, f"data.path={chat}"), f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data format: messages" in (tmp_path / "run" / "train.log").read_text()
    broken = write_json_lines(tmp_path / "broken.jsonl", [RECORDS["messages"], "{not json", RECORDS["messages"]])
    with pytest.raises(ValueError, match=f"{broken}, line 2: not JSON"):
        fit(compose_config(tmp_path / "broken", *hf(*hf_dirs, f"data.path={broken}")))


def test_hub_names_are_read_from_the_local_cache_only(hf_dirs, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    from kd_lightning.models import load_causal_lm

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(hf_dirs[0], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert len(decoder_layers(load_causal_lm("someone/tiny"))) == 4
    with pytest.raises(FileNotFoundError, match="no hub model of that name in the local Hugging Face cache.*hf download someone/other"):
        load_causal_lm("someone/other")


def test_student_from_teacher_layers(hf_dirs, tmp_path):
    teacher = tiny_causal_lm(num_layers=6)
    assert len(decoder_layers(load_student(teacher, layers=[0, 2, 4, -1]))) == 4
    assert len(decoder_layers(load_student(teacher, layers={"every": 3}))) == 2
    dropped = load_student(teacher, layers={"drop_last": 2})
    torch.testing.assert_close(decoder_layers(dropped)[3].mlp.up_proj.weight, decoder_layers(teacher)[3].mlp.up_proj.weight)
    assert len(decoder_layers(dropped)) == dropped.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="drop_last must be between 1 and 5"):
        copy_layers(teacher, drop_last=6)
    with pytest.raises(ValueError, match=r"model.student_path \(a model\) or model.student_layers.*got student_layers=2"):
        load_student(teacher, layers=2)
    cfg = compose_config(tmp_path, *hf(hf_dirs[0], None, "model.student_layers=[0,-1]", f"data.path={write_json_lines(tmp_path / 'd.jsonl', [RECORDS['messages']] * 8)}"))
    trainer = fit(cfg)
    assert len(decoder_layers(trainer.lightning_module.student)) == 2


def test_a_tokenizer_mismatch_names_both_sizes_and_the_first_difference(hf_dirs, tokenizer, tmp_path):
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"student 260 tokens, teacher 259; first difference at id 259: student '<extra>', teacher None"):
        check_same_tokenizer(other, tokenizer)
    student = tmp_path / "student"
    tiny_causal_lm("llama", vocab_size=260, num_layers=2).save_pretrained(student)
    other.save_pretrained(student)
    with pytest.raises(ValueError, match="student 260 tokens, teacher 259"):
        fit(compose_config(tmp_path / "run", *hf(hf_dirs[0], student)))


def test_lora_trains_only_the_adapters_and_exports(tmp_path):
    pytest.importorskip("peft")
    lora = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj]", "export.enabled=true"]
    cfg = compose_config(tmp_path, *TINY, *lora)
    trainer = fit(cfg)
    with open_dict(cfg):  # what kd-train writes for kd-export to read
        del cfg["hydra"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    student = trainer.lightning_module.student
    trained = {name for name, parameter in student.named_parameters() if parameter.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(name.endswith((".q_proj.lora_A.default.weight", ".q_proj.lora_B.default.weight", ".v_proj.lora_A.default.weight", ".v_proj.lora_B.default.weight")) for name in trained)
    assert any(parameter.abs().sum() > 0 for name, parameter in student.named_parameters() if "lora_B" in name)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"student.{name}" for name in trained}

    ids = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 8]])
    with torch.no_grad():
        expected = student.eval()(input_ids=ids).logits
        kd_export([str(tmp_path), str(tmp_path / "merged")])
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(input_ids=ids).logits, expected)
        at_end = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
        torch.testing.assert_close(at_end(input_ids=ids).logits, expected)
    kd_export(["--adapters-only", str(tmp_path), str(tmp_path / "adapters")])
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    _, reloaded, _ = load_run(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected)
    resumed = fit(compose_config(tmp_path, *TINY, *lora, "trainer.max_steps=3", "ckpt_path=last"))
    assert resumed.global_step == 3


def test_the_readme_gpu_recipe_composes(tmp_path):
    """The README's Qwen2.5 recipe, composed (never run or downloaded here)."""
    cfg = compose_config(
        tmp_path, "experiment=qwen_instruct", "data.path=chat.jsonl",
        "model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=[q_proj,v_proj]",
    )
    assert cfg.model.teacher.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.model.teacher.dtype == "bfloat16"
    assert cfg.model.student.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.student.layers is None
    assert cfg.model.tokenizer.name_or_path == cfg.model.teacher_tokenizer.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.path == "chat.jsonl"
    assert dict(cfg.module.lora) == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    pruned = compose_config(tmp_path, "experiment=qwen_instruct", "model.student_path=null", "model.student_layers={drop_last:8}")
    assert pruned.model.student.layers == {"drop_last": 8} and pruned.model.student_tokenizer.name_or_path is None
    sharded = compose_config(
        tmp_path, "experiment=qwen_instruct", "trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=4", "trainer.precision=bf16-mixed"
    )
    assert sharded.trainer.strategy._target_.endswith("SpawnedModelParallelStrategy") and sharded.trainer.precision == "bf16-mixed"


@pytest.mark.slow
def test_lora_under_fsdp_trains_checkpoints_adapters_and_exports(tmp_path):
    import torch.distributed.checkpoint as dcp

    from test_train import kd_train

    out = tmp_path / "OUT"
    run = kd_train("model=tiny", "trainer=fsdp", "trainer.devices=2", "trainer.max_steps=2", "model.lora.r=4", f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    keys = [key for key in dcp.FileSystemReader(str(out / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata if key.startswith("state_dict.")]
    assert keys and all("lora_" in key for key in keys)
    kd_export([str(out), str(tmp_path / "merged")])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_hidden_layers == 2
