"""The data module: templates, prompt masking, over-long examples, errors."""

import gzip
import json

import pytest

from kd_lightning import InstructionDataModule
from kd_lightning.data import SHIPPED, encode_example, format_prompt, resolve_data_path
from kd_lightning.data.datamodule import check_record, detect_format

def test_plain_template_without_chat_template(tokenizer):
    assert tokenizer.chat_template is None
    prompt = format_prompt(tokenizer, "Say hi.", "to Ann")
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Input:\nto Ann\n\n### Response:\n")
    assert "### Input" not in format_prompt(tokenizer, "Say hi.")


def test_chat_template_when_the_tokenizer_has_one(chat_tokenizer):
    assert format_prompt(chat_tokenizer, "Say hi.", "to Ann") == "<|user|>Say hi.\n\nto Ann</s><|assistant|>"


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


# ------------------------------------------------------------ your own data
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "Bye"},
]
RECORDS = {
    "instruction/input/output": {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    "prompt/completion": {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
    "messages": {"messages": TWO_TURNS},
}


def write_json_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_every_assistant_turn_is_trained_and_every_other_turn_masked(chat_tokenizer):
    encoded = encode_example(chat_tokenizer, {"messages": TWO_TURNS}, max_length=512)
    text = chat_tokenizer.decode(encoded["input_ids"])
    assert text == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>Yo</s><|user|>And?</s><|assistant|>Bye</s>"
    trained = [token if label != -100 else None for token, label in zip(encoded["input_ids"], encoded["labels"])]
    spans = "".join("|" if token is None else chat_tokenizer.decode([token]) for token in trained).split("|")
    assert [span for span in spans if span] == ["Yo</s>", "Bye</s>"]
    assert encoded["input_ids"] == chat_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_is_used_verbatim_with_the_completion_trained(tokenizer):
    encoded = encode_example(tokenizer, RECORDS["prompt/completion"], max_length=512)
    prompt_length = len(tokenizer("Q: 2+2?\nA:")["input_ids"])
    assert tokenizer.decode(encoded["input_ids"][:prompt_length]) == "Q: 2+2?\nA:"
    assert encoded["labels"][:prompt_length] == [-100] * prompt_length
    assert tokenizer.decode(encoded["labels"][prompt_length:-1]) == " 4" and encoded["labels"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("format", RECORDS)
def test_each_format_is_detected_and_logged(format, chat_tokenizer, tmp_path, caplog):
    path = write_json_lines(tmp_path / "data.jsonl", [RECORDS[format]] * 6)
    data = InstructionDataModule(chat_tokenizer, path=str(path), val_size=2)
    with caplog.at_level("INFO"):
        data.setup()
    assert f"data format: {format} (detected from the first record of {path})" in caplog.text
    assert len(data.train_set) == 4 and all(any(label != -100 for label in row["labels"]) for row in data.train_set)


@pytest.mark.parametrize("name", ["dolly-test", "self-inst", "vicuna"])
def test_a_format_is_the_first_with_all_its_fields(name, tokenizer):
    """The shipped test sets carry a rendered ``prompt`` beside instruction/output: they
    are instruction data, not prompt/completion data missing its completion."""
    data = InstructionDataModule(tokenizer, path=name, val_size=0, max_train_examples=4, max_length=4096)
    data.setup()
    assert len(data.train_set) == 4
    partial = {"prompt": "Q?", "answer": "A."}
    with pytest.raises(ValueError, match="field 'completion' is missing \\(this data is in the prompt/completion format\\)"):
        check_record(partial, detect_format(partial, "line 1", {}), "line 1", {})


def test_save_to_disk_directory_and_its_split(chat_tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([RECORDS["messages"]] * 5).save_to_disk(tmp_path / "one")
    data = InstructionDataModule(chat_tokenizer, path=str(tmp_path / "one"), val_size=1)
    data.setup()
    assert len(data.train_set) == 4
    DatasetDict({"train": Dataset.from_list([RECORDS["prompt/completion"]] * 3)}).save_to_disk(tmp_path / "dict")
    with pytest.raises(ValueError, match="no split 'test'; its splits: train"):
        InstructionDataModule(chat_tokenizer, path=str(tmp_path / "dict"), split="test").setup()


def test_hub_data_set_from_the_local_cache_only(chat_tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "datasets--someone--chats" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    write_json_lines(snapshot / "train.jsonl", [RECORDS["messages"]] * 3)
    (tmp_path / "hub" / "datasets--someone--chats" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--someone--chats" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = InstructionDataModule(chat_tokenizer, path="someone/chats", val_size=1)
    data.setup()
    assert len(data.train_set) == 2
    with pytest.raises(FileNotFoundError, match="no data file 'someone/other'.*hf download --repo-type dataset"):
        InstructionDataModule(chat_tokenizer, path="someone/other")


def test_column_mapping(tokenizer, tmp_path):
    path = write_json_lines(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}] * 3)
    with pytest.raises(ValueError, match=r"line 1: no known record format in its fields \['answer', 'question'\].*data.columns"):
        InstructionDataModule(tokenizer, path=str(path)).setup()
    data = InstructionDataModule(tokenizer, path=str(path), columns={"prompt": "question", "completion": "answer", "input": None}, val_size=1)
    data.setup()
    assert tokenizer.decode([label for label in data.train_set[0]["labels"] if label != -100]) == "Because.</s>"
    with pytest.raises(ValueError, match="unknown data.columns \\['question'\\]"):
        InstructionDataModule(tokenizer, path=str(path), columns={"question": "prompt"})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', "line 2: not JSON"),
        ('["prompt", "completion"]', "line 2: a JSON list, not an object"),
        ('{"prompt": "a"}', "line 2: field 'completion' is missing"),
        ('{"prompt": "a", "completion": 4}', "line 2: field 'completion' must be a string, got int"),
        ('{"messages": []}', "line 2: field 'messages' is an empty conversation"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "line 2: field 'messages' has no assistant turn"),
        ('{"messages": [{"role": "assistant"}]}', r"line 2: field messages\[0\].content is missing"),
    ],
    ids=["not-json", "not-object", "missing", "not-string", "empty-conversation", "no-assistant", "no-content"],
)
def test_a_bad_record_names_the_file_line_and_field(line, message, chat_tokenizer, tmp_path):
    first = {"messages": TWO_TURNS} if "messages" in line else RECORDS["prompt/completion"]
    path = write_json_lines(tmp_path / "bad.jsonl", [first, line, first])
    with pytest.raises(ValueError, match=f"{path}, {message}"):
        InstructionDataModule(chat_tokenizer, path=str(path)).setup()


def test_a_bad_row_of_a_dataset_is_named(tokenizer):
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    with pytest.raises(ValueError, match=r"the given dataset\[1\]: field 'completion' is missing"):
        InstructionDataModule(tokenizer, dataset=rows).setup()


def test_conversations_need_a_chat_template(tokenizer, tmp_path):
    path = write_json_lines(tmp_path / "chat.jsonl", [RECORDS["messages"]] * 3)
    with pytest.raises(ValueError, match="holds conversations.*the tokenizer has none"):
        InstructionDataModule(tokenizer, path=str(path)).setup()


def test_an_overlong_conversation_is_cut_and_counted(chat_tokenizer):
    encoded = encode_example(chat_tokenizer, {"messages": TWO_TURNS}, max_length=50)
    assert encoded["truncated"] and len(encoded["input_ids"]) == 50
    assert encode_example(chat_tokenizer, {"messages": TWO_TURNS}, max_length=44)["input_ids"] == []
