"""Training across tokenizers (SPEC §6): kd-train with cross_tokenizer=uld|gold|hybrid on
tiny random models of two real tokenizers (GPT-2's ByteLevel BPE teacher, a
SentencePiece-style student), hybrid against the same-tokenizer loss, and bad input."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kd_lightning import DistillationModule
from kd_lightning.alignment import AlignmentError
from kd_lightning.cross_tokenizer import CrossTokenizer, identity_match, tokenizer_match
from kd_lightning.data.cross_tokenizer import CrossTokenizerDataModule
from kd_lightning.models import tiny_causal_lm
from kd_lightning.runs import load_run, run_tokenizer
from kd_lightning.train import fit
from real_tokenizers import gpt2_tokenizer, sentencepiece_tokenizer
from test_train import compose_config, save_run_config
from test_vocabulary import tiny_sentencepiece

SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.val_size=2"]
#: the teacher renders prompts with its own chat template, unlike the student's plain one
TEACHER_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OUTPUTS = ["The student answers.", "return a + b", "Les élèves étudient, naïve café.", "the model and the data 🙂"]


def write_records(path, count=10):
    rows = [{"instruction": f"Say something, number {i}.", "input": "", "output": OUTPUTS[i % len(OUTPUTS)]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory):
    """A tiny GPT-2-tokenizer teacher and a tiny SentencePiece-style student, each saved
    with its tokenizer by save_pretrained: what model=hf reads."""
    root = tmp_path_factory.mktemp("cross")
    teacher_tokenizer = gpt2_tokenizer()
    teacher_tokenizer.chat_template = TEACHER_TEMPLATE
    student_tokenizer = sentencepiece_tokenizer("pre_tokenizer")
    for name, tokenizer, layers, seed in (("teacher", teacher_tokenizer, 2, 1), ("student", student_tokenizer, 1, 2)):
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=layers, initializer_range=0.3, seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "teacher", root / "student"


def cross_overrides(cross_dirs, tmp_path, objective, *overrides):
    teacher, student = cross_dirs
    data = write_records(tmp_path / "data.jsonl")
    return ["model=hf", f"model.teacher_path={teacher}", f"model.student_path={student}", f"cross_tokenizer={objective}",
            f"data.path={data}", "data.max_length=165", "data.batch_size=3", *SHORT, *overrides]


@pytest.mark.parametrize("objective, overrides", [
    ("hybrid", ["selection=adakd", "module.ce_weight=0.2", "temperature=2"]),
    ("uld", []),
    ("gold", []),
])
def test_kd_train_distils_across_two_real_tokenizers(cross_dirs, tmp_path, objective, overrides):
    """kd-train model=hf … cross_tokenizer=<objective> trains end to end; hybrid with the token policies and CE."""
    trainer = fit(compose_config(tmp_path / "run", *cross_overrides(cross_dirs, tmp_path, objective, *overrides)))
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and torch.isfinite(metrics["train/loss"]) and metrics["train/kd_loss"] > 0
    assert isinstance(trainer.datamodule, CrossTokenizerDataModule)


def test_each_side_reads_its_own_template_and_both_stop_at_one_byte(cross_dirs, tmp_path):
    """The teacher's side is its own chat template, the same response and its EOS; a cut
    response ends both sides after the same group, without end markers."""
    from transformers import AutoTokenizer

    teacher_tokenizer, student_tokenizer = (AutoTokenizer.from_pretrained(path) for path in cross_dirs)
    data = CrossTokenizerDataModule(student_tokenizer, teacher_tokenizer, path=write_records(tmp_path / "d.jsonl"),
                                    max_length=160, val_size=0, batch_size=10, shuffle=False)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    for row in range(len(batch["input_ids"])):
        teacher_text = teacher_tokenizer.decode(batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()])
        student_text = student_tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert teacher_text.startswith("<|user|>\nSay something") and "### Instruction" in student_text
        assert batch["attention_mask"][row].sum() <= 160 and batch["teacher_attention_mask"][row].sum() <= 160
        teacher_response = teacher_text.split("<|assistant|>\n", 1)[1].removesuffix("<|endoftext|>")
        student_response = student_text.split("### Response:", 1)[1].strip().removesuffix("</s>")
        assert teacher_response.strip() == student_response.strip()
        assert teacher_text.endswith("<|endoftext|>") == student_text.endswith("</s>")
    groups = batch["group_example_index"]
    assert len(groups) == len(batch["group_student_positions"]) == len(batch["group_teacher_sizes"]) > len(batch["input_ids"])
    assert (batch["group_student_sizes"] >= 1).all() and (batch["group_teacher_sizes"] >= 1).all()


@pytest.fixture(scope="module")
def same_tokenizer_models(chat_tokenizer):
    teacher = tiny_causal_lm("llama", hidden_size=32, num_layers=2, initializer_range=0.3, seed=1).double()
    student = tiny_causal_lm("llama", hidden_size=32, num_layers=1, initializer_range=0.3, seed=2).double()
    return teacher, student


@pytest.mark.parametrize("divergence, ce_weight, loss_impl", [("fkl", 0.0, "fused"), ("jsd", 0.3, "eager")])
def test_hybrid_with_one_tokenizer_is_the_same_tokenizer_loss(chat_tokenizer, records, same_tokenizer_models, divergence, ce_weight, loss_impl):
    """One tokenizer on both sides, the identity match: hybrid's loss and the student's
    gradients equal cross_tokenizer=none's on the same batch, in float64, to 1e-6."""
    data = CrossTokenizerDataModule(chat_tokenizer, chat_tokenizer, dataset=records, max_length=70, val_size=4, batch_size=4)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    ends_with_eos = [int(row[row != -100][-1]) == chat_tokenizer.eos_token_id for row in batch["labels"]]
    assert any(ends_with_eos) and not all(ends_with_eos)  # max_length cut some responses before their end marker
    results = []
    for cross in (None, CrossTokenizer("hybrid", identity_match(len(chat_tokenizer)))):
        teacher, student = (copy.deepcopy(model) for model in same_tokenizer_models)
        module = DistillationModule(student, teacher, divergence=divergence, temperature=2.0, ce_weight=ce_weight,
                                    vocab_size=len(chat_tokenizer), loss_impl=loss_impl, chunk_size=7, cross_tokenizer=cross)
        out = module.distillation_losses(batch, apply_policies=False)
        out["loss"].backward()
        results.append((out, [parameter.grad for parameter in student.parameters()]))
    (same, same_gradients), (hybrid, hybrid_gradients) = results
    for key in ("loss", "kd_loss", "ce_loss"):
        torch.testing.assert_close(hybrid[key], same[key], rtol=1e-6, atol=1e-9)
    assert hybrid["kept_tokens"] == same["kept_tokens"]
    for expected, got in zip(same_gradients, hybrid_gradients):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


class PythonTokenizer(PreTrainedTokenizerFast):
    """Stands for a tokenizer written in Python (transformers 5 ships few): no character offsets."""

    is_fast = False


def test_a_tokenizer_without_offsets_is_refused_before_the_data_is_read(records):
    slow = PythonTokenizer(tokenizer_object=gpt2_tokenizer().backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(TypeError, match="PythonTokenizer is not a fast tokenizer and gives no character offsets"):
        CrossTokenizerDataModule(gpt2_tokenizer(), slow, dataset=records)


def test_a_response_the_sides_cannot_align_names_the_record(tmp_path):
    """A word-level teacher whose tokens skip whitespace leaves a trailing space uncovered."""
    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "Say": 2, "hi": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.Metaspace()
    teacher = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi hi"}, {"instruction": "Say hi.", "input": "", "output": "hi "}]
    data = CrossTokenizerDataModule(gpt2_tokenizer(), teacher, path=write_records_of(tmp_path / "bad.jsonl", rows), val_size=0)
    with pytest.raises(AlignmentError, match=r"example 'record 1': the tokens of \w+ cover the response's bytes up to 2 of 3"):
        data.setup()


def write_records_of(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_vocabularies_with_nothing_in_common_are_refused():
    with pytest.raises(ValueError, match="the vocabulary match is empty"):
        tokenizer_match(tiny_sentencepiece(["▁cat", "dog"]), tiny_sentencepiece(["▁car", "do"]))


def test_different_tokenizers_without_cross_tokenizer_name_the_options(cross_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizers differ.*cross_tokenizer=uld\|gold\|hybrid"):
        fit(compose_config(tmp_path / "run", *cross_overrides(cross_dirs, tmp_path, "none")))


def test_a_gguf_student_with_teacher_layers_is_refused_before_loading():
    from kd_lightning.model_sides import load_student_side

    with pytest.raises(ValueError, match="model.student_gguf_file .* or model.student_layers .*, not both"):
        load_student_side(None, "no-such-dir", layers=[0, -1], gguf_file="student.gguf")


def test_an_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="objective 'uld' takes no parameter beta"):
        CrossTokenizer("uld", identity_match(8), {"beta": 0.5})


@pytest.mark.slow
def test_a_gguf_teacher_with_its_own_tokenizer(cross_dirs, tmp_path):
    """model.teacher_gguf_file: SmolLM2-135M-Instruct and its tokenizer (chat template
    included) from the GGUF file, distilled into the tiny SentencePiece-style student."""
    from real_tokenizers import SMOLLM2_GGUF, package_directory

    pytest.importorskip("gguf")
    directory = package_directory(SMOLLM2_GGUF[0])
    overrides = cross_overrides(cross_dirs, tmp_path, "hybrid", f"model.teacher_gguf_file={SMOLLM2_GGUF[1]}",
                                "trainer.max_steps=1", "data.batch_size=2")
    overrides[1] = f"model.teacher_path={directory}"
    trainer = fit(compose_config(tmp_path / "run", *overrides))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.datamodule.teacher_tokenizer.chat_template


def test_a_run_reads_back_with_each_sides_own_tokenizer(cross_dirs, tmp_path):
    """What kd-eval and kd-export load from a run across tokenizers: the student with the
    tokenizer it trained on, the teacher with its own; not the data's default
    (``model.tokenizer``, the teacher's), which would score the student through another vocabulary."""
    cfg = compose_config(tmp_path / "run", *cross_overrides(cross_dirs, tmp_path, "gold", "trainer.max_steps=1"))
    trainer = fit(cfg)
    save_run_config(cfg, tmp_path / "run")
    tokenizer, student, cfg = load_run(tmp_path / "run")
    assert tokenizer.get_vocab() == trainer.datamodule.tokenizer.get_vocab() != trainer.datamodule.teacher_tokenizer.get_vocab()
    assert student.get_input_embeddings().num_embeddings == len(tokenizer)
    assert run_tokenizer(cfg, "teacher").get_vocab() == trainer.datamodule.teacher_tokenizer.get_vocab()


def test_chunks_and_token_policies_act_on_groups(cross_dirs, tmp_path):
    """The loss and gradients do not depend on the chunk size; a policy's TokenBatch has
    one entry per group, and the KD mean runs over the groups it keeps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_tokenizer, student_tokenizer = (AutoTokenizer.from_pretrained(path) for path in cross_dirs)
    data = CrossTokenizerDataModule(student_tokenizer, teacher_tokenizer, path=write_records(tmp_path / "d.jsonl"),
                                    max_length=170, val_size=0, batch_size=4, shuffle=False)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    groups = len(batch["group_example_index"])
    cross = CrossTokenizer("hybrid", tokenizer_match(teacher_tokenizer, student_tokenizer))
    results, seen = [], []
    for chunk_size in (4, 1000):
        teacher, student = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64) for path in cross_dirs)
        module = DistillationModule(student, teacher, temperature=2.0, chunk_size=chunk_size, cross_tokenizer=cross)
        out = module.distillation_losses(batch, apply_policies=False)
        out["loss"].backward()
        results.append((out["loss"].detach(), [parameter.grad for parameter in student.parameters()]))
    for loss, gradients in results[:-1]:
        torch.testing.assert_close(loss, results[-1][0], rtol=1e-9, atol=0)
        for got, expected in zip(gradients, results[-1][1]):
            torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)

    def keep_the_hardest_half(tokens):
        seen.append(tokens.difficulty())
        tokens.keep &= tokens.difficulty() >= tokens.difficulty().median()

    module.token_policies.append(keep_the_hardest_half)
    out = module.distillation_losses(batch, apply_policies=True)
    assert seen[0].shape == (groups,) and ((seen[0] >= 0) & (seen[0] <= 1)).all()
    assert out["kept_tokens"] == int((seen[0] >= seen[0].median()).sum()) < groups
