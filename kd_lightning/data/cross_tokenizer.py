"""Data for a teacher and a student with different tokenizers (SPEC §6).

Each example is tokenised twice: the student's side as ``InstructionDataModule`` does it
(the prompt rendered by the student's chat template and masked, the response and the
student's EOS trained), and the teacher's own side (the prompt rendered by the
*teacher's* chat template, the same response text, the teacher's EOS). The two
tokenisations of the response are aligned (``kd_lightning.alignment``): groups close at
the byte offsets where both sides end a token, the EOS markers form the last group.

A batch holds the student's ``input_ids``, ``attention_mask`` and ``labels`` (as for one
tokenizer), the teacher's ``teacher_input_ids``, ``teacher_attention_mask`` and
``teacher_labels`` (its response tokens; ``teacher_side`` makes them a one-tokenizer batch
of the teacher's, which is what ``kd-cache`` stores), and the
groups of ``alignment.batch_groups`` flattened to tensors under ``GROUP_KEYS``: the
position predicting each group's first token on each side (indices into the batch's
``[rows × length]`` flattened sequences of that side), the group sizes and the example
row of each group.

A response too long for ``max_length`` tokens on either side is cut after a whole group
(``groups_within``), so both sides stop at the same byte; an example whose prompt leaves
no room for a group on one side is dropped. Conversations (``messages`` records, several
assistant turns) are refused: one response per example.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kd_lightning.alignment import (
    Alignment,
    align,
    batch_groups,
    groups_within,
    require_offsets,
    response_tokens,
)
from kd_lightning.constants import IGNORE_INDEX
from kd_lightning.data.datamodule import InstructionDataModule, counted_positions, example_segments

#: the batch keys of the groups, and the ``GroupBatch`` field each holds
GROUP_KEYS = {
    "group_student_positions": "student_positions",
    "group_teacher_positions": "teacher_positions",
    "group_student_sizes": "student_sizes",
    "group_teacher_sizes": "teacher_sizes",
    "group_example_index": "example_index",
}
#: the ``Alignment`` fields each encoded example stores (as lists), to rebuild it in the collator
ALIGNMENT_FIELDS = (
    "student_starts", "student_sizes", "teacher_starts", "teacher_sizes", "student_groups", "teacher_groups", "byte_ends",
)
#: an example with no group within max_length, every column present (the data set's columns are the first example's)
DROPPED = {
    "input_ids": [], "labels": [], "attention_mask": [],
    "teacher_input_ids": [], "teacher_attention_mask": [], "teacher_labels": [],
    "student_response_start": 0, "teacher_response_start": 0,
    **{f"alignment_{field}": [] for field in ALIGNMENT_FIELDS}, "truncated": False,
}


def prompt_and_response(tokenizer: PreTrainedTokenizerBase, example: dict) -> tuple[str, str]:
    """The prompt as ``tokenizer``'s chat template renders it (the plain template without
    one) and the response text. Raises ``ValueError`` for a conversation."""
    if "messages" in example:
        raise ValueError(
            f"record {example.get('record')}: cross_tokenizer runs take one response per example "
            "(instruction/output or prompt/completion records), not conversations (messages)"
        )
    (prompt, _), (response, _) = example_segments(tokenizer, example)
    return prompt, response


def side_tokens(ids: list[int], response_start: int, end_id: int, kept: int) -> list[int]:
    """The prompt's ids, then the first ``kept`` of the response's ids followed by ``end_id``."""
    return ids[:response_start] + (ids[response_start:] + [end_id])[:kept]


def encode_cross_example(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase, example: dict, max_length: int
) -> dict:
    """Both sides' tokens of one checked record and their alignment, each side cut to
    ``max_length`` tokens after a whole group; dropped (``input_ids`` empty) when no group fits.

    Raises ``alignment.AlignmentError`` naming the record when the two sides' tokens do not
    cover the response's bytes alike.
    """
    name = f"record {example['record']}"
    student_prompt, response = prompt_and_response(student_tokenizer, example)
    teacher_prompt, _ = prompt_and_response(teacher_tokenizer, example)
    student = response_tokens(student_tokenizer, response, student_prompt, example=name)
    teacher = response_tokens(teacher_tokenizer, response, teacher_prompt, example=name)
    alignment = align(student, teacher, example=name)
    count = groups_within(alignment, max_length - student.response_start, max_length - teacher.response_start)
    if count == 0 or student.response_start == 0 or teacher.response_start == 0:
        return dict(DROPPED)
    kept = alignment.first_groups(count)
    student_kept = int(kept.student_starts[-1] + kept.student_sizes[-1])  # response tokens, end marker included
    teacher_kept = int(kept.teacher_starts[-1] + kept.teacher_sizes[-1])
    input_ids = side_tokens(student.input_ids, student.response_start, student_tokenizer.eos_token_id, student_kept)
    teacher_ids = side_tokens(teacher.input_ids, teacher.response_start, teacher_tokenizer.eos_token_id, teacher_kept)
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * student.response_start + input_ids[student.response_start :],
        "attention_mask": [1] * len(input_ids),
        "teacher_input_ids": teacher_ids,
        "teacher_attention_mask": [1] * len(teacher_ids),
        "teacher_labels": [IGNORE_INDEX] * teacher.response_start + teacher_ids[teacher.response_start :],
        "student_response_start": student.response_start,
        "teacher_response_start": teacher.response_start,
        **{f"alignment_{field}": getattr(kept, field).tolist() for field in ALIGNMENT_FIELDS},
        "truncated": count < len(alignment),
    }


def padded(rows: list[list[int]], value: int) -> Tensor:
    """``rows`` right-padded with ``value`` to the longest, as an int64 ``[len(rows), longest]``."""
    longest = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (longest - len(row)) for row in rows], dtype=torch.long)


class GroupCollator:
    """Pads each side's sequences on the right and flattens the examples' groups
    (``alignment.batch_groups``) into the ``GROUP_KEYS`` tensors."""

    def __init__(self, student_pad_id: int, teacher_pad_id: int):
        self.student_pad_id, self.teacher_pad_id = student_pad_id, teacher_pad_id

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        batch = {
            "input_ids": padded([example["input_ids"] for example in examples], self.student_pad_id),
            "attention_mask": padded([example["attention_mask"] for example in examples], 0),
            "labels": padded([example["labels"] for example in examples], IGNORE_INDEX),
            "teacher_input_ids": padded([example["teacher_input_ids"] for example in examples], self.teacher_pad_id),
            "teacher_attention_mask": padded([example["teacher_attention_mask"] for example in examples], 0),
            "teacher_labels": padded([example["teacher_labels"] for example in examples], IGNORE_INDEX),
        }
        if "record" in examples[0]:
            batch["record"] = torch.tensor([example["record"] for example in examples], dtype=torch.long)
        groups = batch_groups(
            [stored_alignment(example) for example in examples],
            [example["student_response_start"] for example in examples],
            [example["teacher_response_start"] for example in examples],
            batch["input_ids"].shape[1],
            batch["teacher_input_ids"].shape[1],
        )
        return batch | {key: getattr(groups, field) for key, field in GROUP_KEYS.items()}


def teacher_side(batch: dict) -> dict[str, Tensor]:
    """The teacher's half of a batch as a one-tokenizer batch (``input_ids``,
    ``attention_mask``, ``labels``, ``record``): what a teacher cache is built from and read by."""
    side = {key: batch[f"teacher_{key}"] for key in ("input_ids", "attention_mask", "labels")}
    return side | ({"record": batch["record"]} if "record" in batch else {})


def counted_rows_at(labels: Tensor, positions: Tensor) -> Tensor:
    """The rows of ``hidden[:, :-1][counted_positions(labels)]`` (a cache's row order) that
    hold the flat ``positions`` (indices into the batch's ``[rows × length]`` sequences);
    each must be a counted position, as the group positions of ``GROUP_KEYS`` are."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = counted_positions(labels)
    counted = counted.flatten()
    if not bool(counted[positions].all()):
        raise ValueError("a group position does not predict a response token: the batch's groups and labels disagree")
    return (counted.cumsum(0) - 1)[positions]


def stored_alignment(example: dict) -> Alignment:
    """The ``Alignment`` an encoded example stores under ``alignment_*``."""
    return Alignment(**{field: torch.tensor(example[f"alignment_{field}"], dtype=torch.long) for field in ALIGNMENT_FIELDS})


class CrossTokenizerDataModule(InstructionDataModule):
    """``InstructionDataModule`` for a teacher with its own tokenizer (see the module docstring).

    Args:
        tokenizer: the student's tokenizer (its ids are the batch's ``input_ids``).
        teacher_tokenizer: the teacher's; both must be fast tokenizers (character offsets).
        **kwargs: as ``InstructionDataModule`` (``max_length`` bounds each side).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase, **kwargs):
        require_offsets(tokenizer)  # refused before any data is read
        require_offsets(teacher_tokenizer)
        super().__init__(tokenizer, **kwargs)
        self.teacher_tokenizer = teacher_tokenizer
        for side in (tokenizer, teacher_tokenizer):  # padding is masked: any id will do, EOS is always there
            if side.pad_token_id is None:
                side.pad_token = side.eos_token
        self.collate = GroupCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)

    def encode_one(self, example: dict) -> dict:
        return encode_cross_example(self.tokenizer, self.teacher_tokenizer, example, self.max_length)
