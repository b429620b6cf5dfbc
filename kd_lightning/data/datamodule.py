"""Instruction data for distillation: JSON Lines or a ``datasets`` dataset, prompt masked."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FILES = Path(__file__).parent / "files"
#: the data shipped with the package (see files/README.md for sources and licenses)
SHIPPED = {
    "dolly": FILES / "dolly" / "train.jsonl.gz",
    "dolly-test": FILES / "dolly" / "test.jsonl.gz",
    "self-inst": FILES / "self-inst" / "test.jsonl.gz",
    "vicuna": FILES / "vicuna" / "test.jsonl.gz",
}

PLAIN_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100


def resolve_data_path(path: str | Path) -> Path:
    """A shipped data set name (``dolly``, ``dolly-test``, ``self-inst``, ``vicuna``) or a file."""
    resolved = SHIPPED.get(str(path), Path(path))
    if not resolved.is_file():
        raise FileNotFoundError(f"no data file {str(path)!r}; give a JSON Lines file or one of: {', '.join(SHIPPED)}")
    return resolved


def load_json_lines(path: Path) -> Dataset:
    """The records of a JSON Lines file (plain or .gz); an empty file gives an empty dataset."""
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as lines:
        if not any(line.strip() for line in lines):
            return Dataset.from_list([])
    return load_dataset("json", data_files=str(path), split="train")


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


def encode_example(tokenizer: PreTrainedTokenizerBase, example: dict, max_length: int) -> dict:
    """Token ids of prompt + response + EOS, labels −100 on the prompt.

    Over-long examples: the response is cut to fit ``max_length`` (``truncated``); when
    the prompt alone leaves no room for a response token the example is dropped
    (``input_ids`` empty).
    """
    prompt = format_prompt(tokenizer, example["instruction"], example.get("input") or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return {"input_ids": [], "labels": [], "attention_mask": [], "truncated": False}
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
        "truncated": truncated,
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
    """Instruction / input / output records, tokenised for distillation.

    Args:
        tokenizer: the student's tokenizer (teacher and student must share it).
        path: a JSON Lines file or a shipped set (``dolly``); ignored if ``dataset`` is given.
        dataset: a ``datasets.Dataset`` with ``instruction``, ``output`` and optional ``input``.
        max_length: tokens per example; longer responses are cut, examples whose prompt
            does not fit are dropped (both counted in the log).
        val_size: examples held out for validation (taken before ``max_train_examples``).
        max_train_examples: use at most this many training examples (``None``: all).
        batch_size: examples per batch (per process); padded to the batch's longest.
        seed: the shuffle that picks the validation and training examples, and the
            seed of the sampler that reshuffles them every epoch.
        shuffle: reshuffle the training examples every epoch.

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
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.path = resolve_data_path(path) if dataset is None else None  # a bad path fails before any model loads
        self.max_length, self.val_size, self.max_train_examples = max_length, val_size, max_train_examples
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.tokenizer.padding_side = "right"  # training pads on the right; generation sets its own side
        self.collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        source = str(self.path) if self.dataset is None else "the given dataset"
        records = self.dataset if self.dataset is not None else load_json_lines(self.path)
        if len(records) == 0:
            raise ValueError(f"the dataset {source} is empty: give a file with instruction/input/output records")
        records = records.shuffle(seed=self.seed)
        val_size = min(self.val_size, len(records) - 1)
        train_end = len(records) if self.max_train_examples is None else min(len(records), val_size + self.max_train_examples)
        self.val_set = self.encode(records.select(range(val_size)), source, "validation")
        self.train_set = self.encode(records.select(range(val_size, train_end)), source, "training")

    def encode(self, records: Dataset, source: str, split: str) -> Dataset:
        """Tokenise ``records`` and drop those whose prompt does not fit, logging the counts."""
        encoded = records.map(
            lambda example: encode_example(self.tokenizer, example, self.max_length),
            remove_columns=records.column_names,
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
