"""Property-based tests of the data readers: whatever a file or directory holds, reading
it either gives every record as an example or stops with the named error (the file and
line, or the data set and row, and the field); never another exception, never a skip."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_lightning import InstructionDataModule

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = {
    "instruction/input/output": ("instruction", "output"),
    "prompt/completion": ("prompt", "completion"),
    "messages": ("messages",),
}
short_text = st.text(max_size=20)
#: text of any code points JSON can carry, lone surrogates excepted (those are a bad field, below)
any_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)


def valid_record(format, prompt, response):
    if format == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    first, second = FORMATS[format]
    return {first: prompt, second: response}


@st.composite
def records(draw, format):
    """Valid records of ``format``, one of whose responses may be huge (cut, not dropped)."""
    rows = [valid_record(format, draw(any_text), draw(any_text)) for _ in range(draw(st.integers(2, 5)))]
    if draw(st.booleans()):
        rows[-1] = valid_record(format, "p", "x" * draw(st.integers(2_000, 50_000)))
    return rows


#: values a field must not have, and the words its error must hold
BAD_VALUES = st.sampled_from([
    (7, "must be a string, got int"), (2.5, "must be a string, got float"), (True, "must be a string, got bool"),
    ([["x"]], "must be a"), ({"a": {"b": "c"}}, "must be a"), (None, "is missing"),
    ("a\ud800b", "is not valid Unicode text"),
])


def nested(depth):
    return "[" * depth + "]" * depth


def load(tokenizer, path):
    """The data module of ``path`` after setup: its examples, or the ValueError it raised."""
    data = InstructionDataModule(tokenizer, path=str(path), val_size=1, max_length=512, batch_size=2)
    try:
        data.setup()
    except ValueError as error:
        return error
    return len(data.train_set) + len(data.val_set)


def write_lines(directory, lines):
    path = Path(directory) / "data.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines))
    return path


@pytest.mark.parametrize("format", FORMATS)
@FUZZ
@given(data=st.data())
def test_valid_records_all_become_examples(format, data, chat_tokenizer):
    rows = data.draw(records(format))
    with tempfile.TemporaryDirectory() as directory:
        assert load(chat_tokenizer, write_lines(directory, [json.dumps(row) for row in rows])) == len(rows)


@pytest.mark.parametrize("format", FORMATS)
@FUZZ
@given(data=st.data(), bad=BAD_VALUES)
def test_a_bad_field_is_named_with_its_line(format, data, bad, chat_tokenizer):
    rows = data.draw(records(format))
    line = data.draw(st.integers(1, len(rows) - 1))  # the first record sets the format
    value, words = bad
    if format == "messages":
        key = data.draw(st.sampled_from(["role", "content"]))
        rows[line]["messages"][-1][key] = value
        field = f"messages[1].{key}"
    else:
        field = repr(data.draw(st.sampled_from(FORMATS[format])))
        rows[line][field.strip("'")] = value
    with tempfile.TemporaryDirectory() as directory:
        path = write_lines(directory, [json.dumps(row, ensure_ascii=True) for row in rows])
        error = load(chat_tokenizer, path)
    assert isinstance(error, ValueError) and str(error).startswith(f"{path}, line {line + 1}: field {field} ")
    assert words in str(error)


BAD_LINES = st.sampled_from([
    (b'{"prompt": "a", "completion": ', "not JSON"), (b"\xff\xfe{}", "not UTF-8 text"), (b'"just a string"', "a JSON str"),
    (b"[1, 2]", "a JSON list"), (nested(100_000).encode(), "nested too deeply"), (b'{"x": ' + b"9" * 5000 + b"}", "not readable JSON"),
    (b'{"prompt": "\xc3', "not UTF-8 text"),
])


@FUZZ
@given(rows=records("prompt/completion"), bad=BAD_LINES, at=st.integers(1, 5))
def test_a_bad_line_is_named(rows, bad, at, tokenizer):
    line, words = bad
    lines = [json.dumps(row) for row in rows]
    at = min(at, len(lines))
    lines.insert(at, line)
    with tempfile.TemporaryDirectory() as directory:
        path = write_lines(directory, lines)
        error = load(tokenizer, path)
    assert isinstance(error, ValueError) and str(error).startswith(f"{path}, line {at + 1}: ") and words in str(error)


@FUZZ
@given(rows=records("prompt/completion"), cut=st.floats(0, 1))
def test_a_truncated_file_loads_its_whole_lines_or_names_the_cut_one(rows, cut, tokenizer):
    whole = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()
    truncated = whole[: int(cut * len(whole))]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.jsonl"
        path.write_bytes(truncated)
        outcome = load(tokenizer, path)
    lines = [line for line in truncated.split(b"\n") if line.strip()]
    if isinstance(outcome, int):
        assert outcome == len(lines) and all(line in whole.split(b"\n") for line in lines)
    else:
        assert str(outcome).startswith((f"{path}, line {len(lines)}: ", f"the dataset {path} is empty"))


@FUZZ
@given(content=st.binary(max_size=2000), gzipped=st.booleans())
def test_random_bytes_end_in_a_named_error(content, gzipped, tokenizer):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / ("data.jsonl.gz" if gzipped else "data.jsonl")
        path.write_bytes(content)
        outcome = load(tokenizer, path)
    assert isinstance(outcome, ValueError) and str(path) in str(outcome)


#: a column of one type for every row (as Arrow stores it), and the words of its error
COLUMN_VALUES = st.sampled_from([
    (st.integers(-5, 5), "must be a string, got int"), (st.lists(short_text, max_size=3), "must be a string, got list"),
    (st.fixed_dictionaries({"text": short_text}), "must be a string, got dict"), (st.none(), "is missing"),
    (st.floats(allow_nan=True), "must be a string, got float"),
])


@FUZZ
@given(data=st.data(), column=COLUMN_VALUES)
def test_a_save_to_disk_directory_names_the_row_and_field(data, column, tokenizer):
    from datasets import Dataset

    values, words = column
    count = data.draw(st.integers(2, 5))
    rows = [{"prompt": data.draw(short_text), "completion": data.draw(values)} for _ in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        Dataset.from_list(rows).save_to_disk(directory)
        error = load(tokenizer, directory)
    assert isinstance(error, ValueError) and str(error).startswith(f"{directory}[0]: field 'completion' ") and words in str(error)


@FUZZ
@given(rows=records("prompt/completion"), damage=st.sampled_from(["data", "state.json", "dataset_info.json"]),
       content=st.binary(max_size=300), keep=st.floats(0, 1))
def test_a_damaged_save_to_disk_directory_is_named(rows, damage, content, keep, tokenizer):
    from datasets import Dataset

    with tempfile.TemporaryDirectory() as directory:
        Dataset.from_list(rows).save_to_disk(directory)
        target = next(Path(directory).glob("data-*.arrow")) if damage == "data" else Path(directory) / damage
        original = target.read_bytes()
        target.write_bytes(original[: int(keep * len(original))] + content)
        outcome = load(tokenizer, directory)
    assert outcome == len(rows) or (isinstance(outcome, ValueError) and str(outcome).startswith(directory))
