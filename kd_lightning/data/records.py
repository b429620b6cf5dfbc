"""Reading and checking records: JSON Lines files (plain or gzip), ``save_to_disk``
directories and cached hub data sets, in the three record formats.

Every way a source can be malformed ends in a ``ValueError`` that names the file and
line (or the data set and row) and, for a record, the field: bytes that are not UTF-8,
lines that are not JSON (truncated, nested too deeply, numbers too long), values of the
wrong type, text that is not valid Unicode, a directory that is not a readable data
set. No record is skipped.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from kd_lightning.models import cached_snapshot

FILES = Path(__file__).parent / "files"
#: the data shipped with the package (see files/README.md for sources and licenses)
SHIPPED = {
    "dolly": FILES / "dolly" / "train.jsonl.gz",
    "dolly-test": FILES / "dolly" / "test.jsonl.gz",
    "self-inst": FILES / "self-inst" / "test.jsonl.gz",
    "vicuna": FILES / "vicuna" / "test.jsonl.gz",
}


#: the record formats, detected in this order: their fields, then optional fields
FORMATS = {
    "messages": (("messages",), ()),
    "prompt/completion": (("prompt", "completion"), ()),
    "instruction/input/output": (("instruction", "output"), ("input",)),
}


def resolve_data_path(path: str | Path) -> Path:
    """A shipped data set name (``dolly``, ``dolly-test``, ``self-inst``, ``vicuna``), a
    file, a directory (``save_to_disk``, or data files), or the local snapshot of a hub
    data set in the Hugging Face cache (never downloaded)."""
    resolved = SHIPPED.get(str(path), Path(path))
    if resolved.exists():
        return resolved
    snapshot = cached_snapshot(str(path), repo_type="dataset")
    if snapshot is None:
        raise FileNotFoundError(
            f"no data file {str(path)!r}: give a JSON Lines file, a directory written by "
            "datasets.Dataset.save_to_disk, a hub data set in the local Hugging Face cache "
            f"(fetch it first, e.g. `hf download --repo-type dataset NAME`), or one of: {', '.join(SHIPPED)}"
        )
    return Path(snapshot)


def json_record(line: bytes, where: str) -> dict:
    """The JSON object on one line of a JSON Lines file; anything else is a ``ValueError``
    naming ``where`` (the file and line)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{line[error.start]:02x} at byte {error.start + 1} of the line); "
            "save the file as UTF-8"
        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise ValueError(f"{where}: not readable JSON (nested too deeply); each line must be one JSON object") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"{where}: not readable JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object with fields")
    return record


def read_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSON Lines file (plain or
    .gz, UTF-8 with or without a byte-order mark); a line that is not a JSON object, or a
    .gz file that is not whole, is an error naming the file and the line."""
    number = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
                if line.strip():
                    yield number, json_record(line, f"{path}, line {number}")
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}, line {number + 1}: not a whole gzip file ({error})") from None


def load_json_lines(path: Path) -> Dataset:
    """The records of a JSON Lines file (plain or .gz); an empty file gives an empty dataset."""
    return Dataset.from_list([record for _, record in read_json_lines(path)])


def located_records(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` of every record at ``path`` (see ``resolve_data_path``): the
    location names the file and line, or the data set and row (``DIR[row]``, from 0)."""
    if path.is_file():
        yield from ((f"{path}, line {number}", record) for number, record in read_json_lines(path))
        return
    dataset = open_data_directory(path, split)
    rows = iter(dataset)
    for index in range(len(dataset)):
        try:
            record = next(rows)
        except Exception as error:  # a data file damaged after its index was read
            raise unreadable(path, error, f"[{index}]") from error
        yield f"{path}[{index}]", record


def unreadable(path: Path, error: Exception, row: str = "") -> ValueError:
    return ValueError(
        f"{path}{row}: not a readable data set ({type(error).__name__}: {error}); give a directory written by "
        "datasets.Dataset.save_to_disk, data files (.jsonl, .json, .csv, .parquet) or a cached hub data set"
    )


def open_data_directory(path: Path, split: str) -> Dataset:
    """The ``split`` of a ``save_to_disk`` directory, a directory of data files, or a cached
    hub data set; one that cannot be read is a ``ValueError`` naming the directory."""
    is_saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        dataset = load_from_disk(str(path)) if is_saved else load_dataset(str(path), split=split)
    except Exception as error:  # datasets and pyarrow raise many types for a damaged directory
        raise unreadable(path, error) from error
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(dataset)} (set data.split)")
        dataset = dataset[split]
    return dataset


def detect_format(record: dict, location: str, columns: Mapping[str, str]) -> str:
    """The format of ``record`` (see ``FORMATS``), its fields renamed by ``columns``: the
    first whose required fields are all there, else the first whose leading field is (so
    that ``check_record`` names the missing one)."""
    present = {name: [columns.get(field, field) in record for field in fields] for name, (fields, _) in FORMATS.items()}
    for complete in (all, lambda found: found[0]):
        for name, found in present.items():
            if complete(found):
                return name
    expected = "; ".join(" + ".join(fields) for fields, _ in FORMATS.values())
    raise ValueError(
        f"{location}: no known record format in its fields {sorted(record)}; expected {expected}, "
        "or map your names with data.columns (e.g. data.columns.prompt=question data.columns.completion=answer)"
    )


def check_record(record: dict, format: str, location: str, columns: Mapping[str, str]) -> dict:
    """The fields of ``format`` from ``record`` under their standard names, after checking
    them; a missing or mistyped field is an error naming ``location`` and the field."""
    fields, optional = FORMATS[format]
    checked = {}
    for field in (*fields, *optional):
        name = columns.get(field, field)
        value = record.get(name)
        if value is None and field in optional:
            value = ""
        elif value is None:
            raise ValueError(f"{location}: field {name!r} is missing (this data is in the {format} format)")
        elif field == "messages":
            value = check_messages(value, location, name)
        elif not isinstance(value, str):
            raise ValueError(f"{location}: field {name!r} must be a string, got {type(value).__name__}")
        checked[field] = check_text(value, location, repr(name)) if isinstance(value, str) else value
    return checked


def check_text(text: str, location: str, field: str) -> str:
    """``text``, checked to be valid Unicode: JSON escapes can spell lone surrogate halves
    (``"\\ud800"``), which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{location}: field {field} is not valid Unicode text (a lone surrogate U+{ord(text[error.start]):04X} at "
            f"character {error.start})"
        ) from None
    return text


def check_messages(messages, location: str, name: str) -> list[dict]:
    """A conversation: a non-empty list of ``{"role", "content"}`` with string values and
    at least one assistant turn."""
    if not isinstance(messages, list):
        raise ValueError(f"{location}: field {name!r} must be a list of {{role, content}} turns, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{location}: field {name!r} is an empty conversation")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"{location}: field {name}[{index}] must be a {{role, content}} turn, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = "is missing" if message.get(key) is None else f"must be a string, got {type(message[key]).__name__}"
                raise ValueError(f"{location}: field {name}[{index}].{key} {problem}")
        turns.append({key: check_text(message[key], location, f"{name}[{index}].{key}") for key in ("role", "content")})
    if not any(turn["role"] == "assistant" for turn in turns):
        roles = ", ".join(sorted({turn["role"] for turn in turns}))
        raise ValueError(f"{location}: field {name!r} has no assistant turn (roles: {roles}): nothing to distil")
    return turns


