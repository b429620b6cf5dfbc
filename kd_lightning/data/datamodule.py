"""Data for distillation: JSON Lines, a ``save_to_disk`` directory or a cached hub data
set, in one of three record formats, tokenised with the prompt masked out of the loss.

Formats (detected from the first record, in this order):

- ``messages``: a list of ``{"role", "content"}`` turns rendered by the tokenizer's chat
  template; the loss covers every assistant turn, every other turn is masked;
- ``prompt`` / ``completion``: plain strings, used verbatim; the loss covers the completion;
- ``instruction`` / ``input`` (optional) / ``output``: the instruction (and input) as the
  user turn of the chat template, or the plain Alpaca-style template; the loss covers the output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from kd_lightning.constants import IGNORE_INDEX, PLAIN_TEMPLATE, PLAIN_TEMPLATE_WITH_INPUT
from kd_lightning.data.records import (  # noqa: F401 (load_json_lines, read_json_lines: imported from here elsewhere)
    FORMATS,
    SHIPPED,
    check_record,
    detect_format,
    load_json_lines,
    located_records,
    read_json_lines,
    resolve_data_path,
)

log = logging.getLogger(__name__)

def counted_positions(labels: Tensor) -> Tensor:
    """``[B, T − 1]`` bool: the positions whose next token is a counted label (position i
    predicts token i + 1, as in Hugging Face): the positions a distillation loss uses."""
    return labels[:, 1:] != IGNORE_INDEX


def format_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input: str = "") -> str:
    """The prompt text: the tokenizer's chat template with the instruction (and its input)
    as the user turn, ready for the assistant's reply; the plain Alpaca-style template
    when the tokenizer has no chat template."""
    if tokenizer.chat_template:
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    template = PLAIN_TEMPLATE_WITH_INPUT if input else PLAIN_TEMPLATE
    return template.format(instruction=instruction, input=input)


def conversation_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """A conversation rendered by the tokenizer's chat template, as ``(text, trained)``
    pieces: each assistant turn (with the template's end-of-turn marker) is trained, the
    text before it (system and user turns, the assistant header) is not. Turns after the
    last assistant turn are left out: they teach nothing."""
    pieces, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (prompt.startswith(rendered) and through.startswith(prompt)):
            # e.g. templates that rewrite earlier turns once a later one exists
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as its earlier turns followed "
                "by the next: its assistant turns cannot be told apart; give prompt/completion records instead"
            )
        pieces += [(prompt[len(rendered) :], False), (through[len(prompt) :], True)]
        rendered = through
    return pieces


def example_segments(tokenizer: PreTrainedTokenizerBase, example: dict) -> list[tuple[str, bool]]:
    """The text of a checked record (``check_record``) as ``(text, trained)`` pieces."""
    if "messages" in example:
        return conversation_segments(tokenizer, example["messages"])
    if "prompt" in example:
        return [(example["prompt"], False), (example["completion"], True)]
    return [(format_prompt(tokenizer, example["instruction"], example.get("input") or ""), False), (example["output"], True)]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: dict, max_length: int) -> dict:
    """Token ids of the example's pieces (``example_segments``), labels −100 on those not
    trained; an EOS token ends a completion or output (a chat template ends its turns itself).

    Over-long examples are cut to ``max_length`` (``truncated``); when no trained token
    fits (the prompt alone is too long) the example is dropped (``input_ids`` empty).
    """
    input_ids, labels = [], []
    for text, trained in example_segments(tokenizer, example):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if "messages" not in example:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        return {"input_ids": [], "labels": [], "attention_mask": [], "truncated": False}
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "attention_mask": [1] * min(len(input_ids), max_length),
        "truncated": len(input_ids) > max_length,
    }


class ResumableSampler(DistributedSampler):
    """PyTorch's ``DistributedSampler`` (this process's share of a permutation seeded by
    ``seed + epoch``; Lightning sets the epoch before each one) that can resume in the
    middle of an epoch: its state is the epoch and how many of its indices were handed out.

    A state saved at the end of an epoch starts the next epoch from its beginning. (The
    stateful samplers of ``torchdata`` 0.11 restore the end of an epoch as an empty or a
    differently shuffled next epoch.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.handed_out, self.handed_out_epoch = 0, 0

    def __iter__(self):
        indices = list(super().__iter__())
        resuming = self.handed_out_epoch == self.epoch and self.handed_out < len(indices)
        start = self.handed_out if resuming else 0
        self.handed_out_epoch = self.epoch
        for self.handed_out in range(start + 1, len(indices) + 1):
            yield indices[self.handed_out - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.handed_out_epoch, "handed_out": self.handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.handed_out_epoch, self.handed_out = state_dict["epoch"], state_dict["handed_out"]


class InstructionDataModule(L.LightningDataModule):
    """Records in one of the ``FORMATS``, tokenised for distillation with the prompt masked.

    Args:
        tokenizer: the student's tokenizer (teacher and student must share it).
        path: a JSON Lines file, a ``save_to_disk`` directory, a hub data set in the local
            cache, or a shipped set (``dolly``); ignored if ``dataset`` is given.
        dataset: a ``datasets.Dataset`` of records in one of the formats.
        max_length: tokens per example; longer examples are cut, examples whose prompt
            does not fit are dropped (both counted in the log).
        val_size: examples held out for validation (taken before ``max_train_examples``).
        max_train_examples: use at most this many training examples (``None``: all).
        batch_size: examples per batch (per process); padded to the batch's longest.
        split_seed: the shuffle that picks the validation and training examples; fixed by
            default, so that runs of several seeds train on the same examples (and share a
            teacher cache).
        seed: the seed of the sampler that reshuffles the training examples every epoch.
        shuffle: reshuffle the training examples every epoch.
        split: the split of a directory or hub data set with several.
        columns: the record's names for the standard fields, e.g. ``{"prompt": "question"}``
            (``None`` values: the standard name).

    The format is detected from the first record and logged; every record is checked
    against it, and a bad one is an error naming the file and line (or row) and the field.

    The training loader is a ``torchdata`` ``StatefulDataLoader`` over a
    ``ResumableSampler``: Lightning saves the loader's state (the epoch and the position
    in it) in every checkpoint, so a resumed run continues with the batches the
    interrupted one was about to see.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        path: str | Path = "dolly",
        dataset: Dataset | None = None,
        max_length: int = 256,
        val_size: int = 100,
        max_train_examples: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        split: str = "train",
        columns: Mapping[str, str] | None = None,
        split_seed: int = 0,
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        standard = {field for fields, optional in FORMATS.values() for field in (*fields, *optional)}
        if unknown := set(columns or {}) - standard:
            raise ValueError(f"unknown data.columns {sorted(unknown)}; valid: {', '.join(sorted(standard))}")
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.path = resolve_data_path(path) if dataset is None else None  # a bad path fails before any model loads
        self.split = split
        self.columns = {field: name for field, name in (columns or {}).items() if name is not None}
        self.max_length, self.val_size, self.max_train_examples = max_length, val_size, max_train_examples
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.split_seed = split_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.tokenizer.padding_side = "right"  # training pads on the right; generation sets its own side
        self.collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = str(self.path) if self.dataset is None else "the given dataset"
        records = self.checked_records(source)
        # each example keeps its index in the source (``record``): the teacher cache is keyed by it
        records = records.add_column("record", range(len(records))).shuffle(seed=self.split_seed)
        val_size = min(self.val_size, len(records) - 1)
        train_end = len(records) if self.max_train_examples is None else min(len(records), val_size + self.max_train_examples)
        self.val_set = self.encode(records.select(range(val_size)), source, "validation")
        self.train_set = self.encode(records.select(range(val_size, train_end)), source, "training")

    def checked_records(self, source: str) -> Dataset:
        """Every record, checked against the format of the first and reduced to its fields."""
        if self.dataset is not None:
            located = ((f"the given dataset[{index}]", record) for index, record in enumerate(self.dataset))
        else:
            located = located_records(self.path, self.split)
        checked, format = [], None
        for location, record in located:
            if format is None:
                format = detect_format(record, location, self.columns)
            checked.append(check_record(record, format, location, self.columns))
        if format is None:
            raise ValueError(f"the dataset {source} is empty: give records in one of the formats {', '.join(FORMATS)}")
        log.info("data format: %s (detected from the first record of %s)", format, source)
        if format == "messages" and not self.tokenizer.chat_template:
            raise ValueError(
                f"{source} holds conversations (messages), which the tokenizer's chat template renders, but the "
                "tokenizer has none: use a tokenizer with a chat template, or give prompt/completion records"
            )
        return Dataset.from_list(checked)

    def encode(self, records: Dataset, source: str, split: str) -> Dataset:
        """Tokenise ``records`` and drop those whose prompt does not fit, logging the counts."""
        if not len(records):  # e.g. the validation split of val_size=0
            return records.with_format("python")
        encoded = records.map(
            self.encode_one,
            remove_columns=[name for name in records.column_names if name != "record"],
            desc=f"tokenising {split} data",
        )
        kept = encoded.filter(lambda example: len(example["input_ids"]) > 0)
        dropped, truncated = len(encoded) - len(kept), sum(kept["truncated"])
        log.info(
            "%s data from %s: %d examples, %d responses cut to max_length=%d, %d dropped (prompt longer than max_length)",
            split, source, len(kept), truncated, self.max_length, dropped,
        )
        if len(encoded) and not len(kept):
            raise ValueError(
                f"every {split} prompt in {source} is longer than max_length={self.max_length} tokens; "
                "raise data.max_length"
            )
        return kept.remove_columns("truncated").with_format("python")

    def encode_one(self, example: dict) -> dict:
        """One checked record's tokens (``encode_example``); a subclass may encode otherwise."""
        return encode_example(self.tokenizer, example, self.max_length)

    def train_dataloader(self) -> StatefulDataLoader:
        world_size, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        sampler = ResumableSampler(self.train_set, world_size, rank, shuffle=self.shuffle, seed=self.seed)
        return StatefulDataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.collate, generator=self.loader_generator(),
        )

    def val_dataloader(self) -> StatefulDataLoader:
        return self.loader(self.val_set, shuffle=False)

    def loader(self, dataset: Dataset, shuffle: bool) -> StatefulDataLoader:
        return StatefulDataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, collate_fn=self.collate,
            generator=self.loader_generator(),
        )

    def loader_generator(self) -> torch.Generator:
        """A loader's own generator, for the seeds it draws when it starts an epoch: they
        would otherwise come from the global generator, whose state a resumed run restores
        at its first training step (``callbacks.RandomState``), not at the loops' epoch starts."""
        return torch.Generator().manual_seed(self.seed)
