"""The data module: templates, prompt masking, over-long examples, errors."""

import gzip
import json

import pytest

from kd_lightning import InstructionDataModule
from kd_lightning.data import SHIPPED, encode_example, format_prompt, resolve_data_path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_plain_template_without_chat_template(tokenizer):
    assert tokenizer.chat_template is None
    prompt = format_prompt(tokenizer, "Say hi.", "to Ann")
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Input:\nto Ann\n\n### Response:\n")
    assert "### Input" not in format_prompt(tokenizer, "Say hi.")


def test_chat_template_when_the_tokenizer_has_one(tokenizer):
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    chat.chat_template = CHAT_TEMPLATE
    assert format_prompt(chat, "Say hi.", "to Ann") == "<|user|>Say hi.\n\nto Ann</s><|assistant|>"


def test_prompt_masked_response_and_eos_counted(tokenizer):
    example = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    encoded = encode_example(tokenizer, example, max_length=512)
    prompt_length = len(tokenizer(format_prompt(tokenizer, "Say hi."))["input_ids"])
    assert encoded["labels"][:prompt_length] == [-100] * prompt_length
    response = encoded["labels"][prompt_length:]
    assert tokenizer.decode(response[:-1]) == "Hi!" and response[-1] == tokenizer.eos_token_id
    assert encoded["input_ids"][prompt_length:] == response and not encoded["truncated"]


def test_overlong_response_cut_and_overlong_prompt_dropped(tokenizer):
    example = {"instruction": "Say hi.", "input": "", "output": "Hi! " * 100}
    prompt_length = len(tokenizer(format_prompt(tokenizer, "Say hi."))["input_ids"])
    cut = encode_example(tokenizer, example, max_length=prompt_length + 5)
    assert cut["truncated"] and len(cut["input_ids"]) == prompt_length + 5
    assert encode_example(tokenizer, example, max_length=prompt_length)["input_ids"] == []


def test_datamodule_batches_and_split(datamodule):
    assert len(datamodule.val_set) == 4 and len(datamodule.train_set) == 20
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "record"}
    # each example's index in the source, unique across the split (the teacher cache's key)
    records = {int(r) for split in (datamodule.train_set, datamodule.val_set) for r in split["record"]}
    assert records == set(range(24))
    padding = batch["attention_mask"] == 0
    assert (batch["labels"][padding] == -100).all()
    assert ((batch["labels"] != -100).sum(1) > 0).all()


def test_counts_of_cut_and_dropped_examples_are_logged(tokenizer, records, caplog):
    data = InstructionDataModule(tokenizer, dataset=records, max_length=200, val_size=4)
    with caplog.at_level("INFO"):
        data.setup()
    assert "dropped (prompt longer than max_length)" in caplog.text
    assert len(data.train_set) < 20  # the records with an input no longer fit


def test_every_prompt_too_long_is_an_error(tokenizer, records):
    with pytest.raises(ValueError, match="longer than max_length=16.*raise data.max_length"):
        InstructionDataModule(tokenizer, dataset=records, max_length=16, val_size=4).setup()


def test_empty_dataset_is_an_error(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        InstructionDataModule(tokenizer, path=str(empty)).setup()


def test_missing_file_names_the_shipped_sets():
    with pytest.raises(FileNotFoundError, match="dolly, dolly-test, self-inst, vicuna"):
        resolve_data_path("no/such.jsonl")


def test_json_lines_file(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) for i in range(6)))
    data = InstructionDataModule(tokenizer, path=str(path), val_size=2, max_length=256)
    data.setup()
    assert len(data.train_set) == 4 and len(data.val_set) == 2


def test_shipped_data_is_complete():
    counts = {"dolly": 14011, "dolly-test": 1000, "self-inst": 242, "vicuna": 80}
    for name, expected in counts.items():
        with gzip.open(SHIPPED[name], "rt") as lines:
            rows = [json.loads(line) for line in lines]
        assert len(rows) == expected and all({"instruction", "output"} <= set(row) for row in rows)
    assert (SHIPPED["dolly"].parent.parent / "README.md").is_file()
