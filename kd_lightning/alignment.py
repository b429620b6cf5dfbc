"""Byte spans of response tokens and the alignment of two tokenisations (SPEC §6).

Definitions:

- **Byte span.** Each response token covers the UTF-8 bytes ``[start, end)`` of the
  response (offsets relative to the response's first byte). The spans of one side tile
  the response: the first starts at 0, each starts where the previous ends, the last ends
  at the response's length. They come from the fast tokenizer's character offsets; where
  several tokens share one character (ByteLevel BPE splitting an emoji or a CJK
  character into byte pieces, SentencePiece's ``<0xNN>`` byte fallback) the character's
  bytes are shared out in token order by the bytes each token stands for
  (``kd_lightning.vocabulary``), so the span ends fall inside the character, on the true
  byte. A zero-width token (a SentencePiece ``▁`` the text does not hold) has
  ``start == end``.
- **Common boundaries.** The byte offsets greater than 0 where a token of each side ends.
- **Groups.** Group g covers the bytes between common boundaries g − 1 and g (from 0 for
  the first group); S_g and T_g are the student's and the teacher's tokens whose spans
  end in it. The end-of-response markers (each side's EOS or end-of-turn, after the
  response) form the last group. Groups are contiguous runs of token indices.
- **Positions.** As in Hugging Face, the logits at sequence position i predict token
  i + 1. A group's tokens are predicted from position ``response_start + first − 1``
  onwards, where ``first`` is the group's first token's index in the response and
  ``response_start`` the index of the response's first token in the sequence. At that
  first position both models have read exactly the same response bytes.
- **Cutting.** A response too long for a budget of tokens is cut after a whole group
  (``groups_within``, ``Alignment.first_groups``), so both sides stop at the same byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from kd_lightning.vocabulary import byte_lengths


class AlignmentError(ValueError):
    """Two tokenisations of a response that do not cover the same bytes."""


@dataclass(frozen=True)
class ResponseTokens:
    """One side's tokens of ``prefix + response`` and the byte spans of the response's."""

    input_ids: list[int]  # every token, prefix first; no end marker
    response_start: int  # index in input_ids of the response's first token
    byte_spans: Tensor  # int64 [n_response_tokens, 2]: [start, end) in the response's bytes
    response: bytes  # the response, UTF-8
    crosses_prefix: bool  # the first response token also holds the prefix's last bytes (":H" after "Assistant:")

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :]


def response_tokens(
    tokenizer: PreTrainedTokenizerBase, response: str, prefix: str = "", example: str = ""
) -> ResponseTokens:
    """Tokenise ``prefix + response`` (no special tokens added: the prefix, e.g. the prompt
    rendered by this side's chat template, carries any BOS) and the byte span of every
    response token.

    A token that crosses from the prefix into the response (Llama 3 merges ``:`` with a
    following word) counts as the response's first token, its span starting at 0, and
    ``crosses_prefix`` is set: the position predicting it has not read the prefix's end.

    Raises ``TypeError`` for a tokenizer without character offsets, ``AlignmentError``
    when the tokens do not cover the response (naming ``example``, the tokenizer and the
    byte where their coverage stops).
    """
    require_offsets(tokenizer)
    text = prefix + response
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]
    if text and ids and all(pair == (0, 0) for pair in offsets):
        raise TypeError(
            f"{type(tokenizer).__name__} gives every token the character offsets (0, 0): byte spans need a "
            "tokenizer with real offsets (a fast tokenizer built from tokenizer.json)"
        )
    first = 0 if not prefix else next((k for k, (_, end) in enumerate(offsets) if end > len(prefix)), len(ids))
    character_bytes = utf8_offsets(text)
    character_offsets = np.asarray(offsets[first:], dtype=np.int64).reshape(-1, 2)
    relative = character_bytes[character_offsets] - character_bytes[len(prefix)]
    byte_offsets = [tuple(pair) for pair in np.maximum(relative, 0).tolist()]
    runs = overlapping_runs(byte_offsets)
    shared = [k for run_first, run_last in runs if run_last > run_first for k in range(run_first, run_last + 1)]
    lengths = dict(zip(shared, byte_lengths(tokenizer, [ids[first + k] for k in shared])))
    ends = token_byte_ends(byte_offsets, runs, lengths)
    encoded = response.encode("utf-8")
    if (ends[-1] if ends else 0) != len(encoded):
        raise AlignmentError(
            f"example {example!r}: the tokens of {type(tokenizer).__name__} cover the response's bytes up to "
            f"{ends[-1] if ends else 0} of {len(encoded)}"
        )
    spans = torch.tensor(list(zip([0, *ends[:-1]], ends)), dtype=torch.long).reshape(-1, 2)
    crosses = first < len(offsets) and offsets[first][0] < len(prefix)
    return ResponseTokens(
        input_ids=ids, response_start=first, byte_spans=spans, response=encoded, crosses_prefix=crosses
    )


def utf8_offsets(text: str) -> np.ndarray:
    """The UTF-8 byte offset of each character of ``text``, and its byte length last."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lengths = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])


def require_offsets(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that cannot report character offsets (a slow, Python one)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer and gives no character offsets, which byte spans "
            "need: load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True), or "
            "PreTrainedTokenizerFast(tokenizer_file='tokenizer.json'))"
        )


def overlapping_runs(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The first and last index of each run of tokens whose offsets overlap: each starts
    before the run so far ends. Tokens that share no character are runs of one."""
    runs, first = [], 0
    while first < len(offsets):
        last, reach = first, offsets[first][1]
        while last + 1 < len(offsets) and offsets[last + 1][0] < reach:
            last += 1
            reach = max(reach, offsets[last][1])
        runs.append((first, last))
        first = last + 1
    return runs


def token_byte_ends(
    offsets: list[tuple[int, int]], runs: list[tuple[int, int]], lengths: dict[int, int | None]
) -> list[int]:
    """Each token's end in the response's bytes, from its byte offsets (relative to the
    response, clamped at 0), its run and, in a run of several, its byte length.

    Tokens of one run share characters: ByteLevel pieces of one emoji, ``<0xNN>`` pieces
    of one CJK character, SentencePiece's virtual ``▁`` given the first character's
    offsets. A run's tokens take their lengths from the run's end backwards, the first
    keeping what is left (none, for a virtual ``▁``). A run with a token of unknown length
    keeps its offsets' ends.
    """
    ends: list[int] = []
    for first, last in runs:
        before = ends[-1] if ends else 0
        run_lengths = [lengths.get(k) for k in range(first + 1, last + 1)]
        if last > first and None not in run_lengths:
            run_end = max(before, *(end for _, end in offsets[first : last + 1]))
            later = list(accumulate(reversed(run_lengths), initial=0))[::-1]
            ends.extend(max(before, run_end - after) for after in later)
        else:
            for _, end in offsets[first : last + 1]:
                ends.append(max(ends[-1] if ends else 0, end))
    return ends


@dataclass(frozen=True)
class Alignment:
    """The groups of one response (see the module docstring); G groups, the last the end
    markers'. Token indices count from the response's first token; the end marker's index
    is the number of response tokens. Every tensor is int64."""

    student_starts: Tensor  # [G] index of each group's first student token
    student_sizes: Tensor  # [G] |S_g| ≥ 1
    teacher_starts: Tensor  # [G]
    teacher_sizes: Tensor  # [G] |T_g| ≥ 1
    student_groups: Tensor  # [n_student + 1] the group of each student token, end marker last
    teacher_groups: Tensor  # [n_teacher + 1]
    byte_ends: Tensor  # [G] the common boundary closing each group (the end markers': the response length)

    def __len__(self) -> int:
        return len(self.byte_ends)

    def first_groups(self, count: int) -> Alignment:
        """The alignment of the response cut after its first ``count`` groups (for a
        sequence-length budget, see ``groups_within``): the end markers' group stays only
        when ``count == len(self)``."""
        if not 0 <= count <= len(self):
            raise ValueError(f"an alignment of {len(self)} groups has no first {count}")
        student_tokens = int(self.student_starts[count - 1] + self.student_sizes[count - 1]) if count else 0
        teacher_tokens = int(self.teacher_starts[count - 1] + self.teacher_sizes[count - 1]) if count else 0
        return Alignment(
            student_starts=self.student_starts[:count],
            student_sizes=self.student_sizes[:count],
            teacher_starts=self.teacher_starts[:count],
            teacher_sizes=self.teacher_sizes[:count],
            student_groups=self.student_groups[:student_tokens],
            teacher_groups=self.teacher_groups[:teacher_tokens],
            byte_ends=self.byte_ends[:count],
        )


def groups_within(alignment: Alignment, student_tokens: int, teacher_tokens: int) -> int:
    """How many leading groups fit when the student keeps at most ``student_tokens`` of its
    response tokens (end marker included) and the teacher ``teacher_tokens``: cutting both
    sides there cuts them at the same byte."""
    student_fits = alignment.student_starts + alignment.student_sizes <= student_tokens
    teacher_fits = alignment.teacher_starts + alignment.teacher_sizes <= teacher_tokens
    return int((student_fits & teacher_fits).sum())  # group ends grow, so the fitting groups lead


def align(student: ResponseTokens, teacher: ResponseTokens, example: str = "") -> Alignment:
    """The groups of two tokenisations of one response. Raises ``AlignmentError`` naming
    ``example`` and the first byte where the two responses' texts differ."""
    if student.response != teacher.response:
        differ = next(
            (k for k, (a, b) in enumerate(zip(student.response, teacher.response)) if a != b),
            min(len(student.response), len(teacher.response)),
        )
        raise AlignmentError(
            f"example {example!r}: the student's and the teacher's responses differ from byte {differ} "
            f"(student {student.response[differ:differ + 16]!r}, teacher {teacher.response[differ:differ + 16]!r}); "
            "both sides must tokenise the same response text"
        )
    return align_spans(student.byte_spans, teacher.byte_spans, example)


def align_spans(student_spans: Tensor, teacher_spans: Tensor, example: str = "") -> Alignment:
    """The groups of two sides' byte spans (int64 ``[n, 2]`` each, tiling the response),
    end markers appended. Raises ``AlignmentError`` naming ``example`` and the first byte
    offset where the two sides' coverage of the response diverges."""
    check_same_coverage(student_spans, teacher_spans, example)
    student_ends, teacher_ends = student_spans[:, 1].cpu().numpy(), teacher_spans[:, 1].cpu().numpy()
    boundaries = np.intersect1d(student_ends, teacher_ends)  # sorted, unique
    boundaries = boundaries[boundaries > 0]
    # a token belongs to the first group whose closing boundary is at or after its end;
    # the end markers make one more group
    student_groups = np.append(np.searchsorted(boundaries, student_ends), len(boundaries))
    teacher_groups = np.append(np.searchsorted(boundaries, teacher_ends), len(boundaries))
    response_length = student_ends[-1:] if len(student_ends) else np.zeros(1, dtype=np.int64)
    student_starts, student_sizes = group_runs(student_groups, len(boundaries) + 1)
    teacher_starts, teacher_sizes = group_runs(teacher_groups, len(boundaries) + 1)
    as_tensor = lambda values: torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))  # noqa: E731
    return Alignment(
        student_starts=as_tensor(student_starts),
        student_sizes=as_tensor(student_sizes),
        teacher_starts=as_tensor(teacher_starts),
        teacher_sizes=as_tensor(teacher_sizes),
        student_groups=as_tensor(student_groups),
        teacher_groups=as_tensor(teacher_groups),
        byte_ends=as_tensor(np.append(boundaries, response_length)),
    )


def group_runs(groups: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first index and the size of each group, given each token's (non-decreasing) group."""
    sizes = np.bincount(groups, minlength=count)
    return np.cumsum(sizes) - sizes, sizes


def coverage_break(spans: Tensor) -> int | None:
    """The first byte offset where ``spans`` stop tiling from 0 (a gap, an overlap or a
    span ending before it starts), or ``None`` when they tile."""
    starts, ends = spans[:, 0].tolist(), spans[:, 1].tolist()
    expected = 0
    for start, end in zip(starts, ends):
        if start != expected or end < start:
            return expected
        expected = end
    return None


def check_same_coverage(student_spans: Tensor, teacher_spans: Tensor, example: str) -> None:
    """Raise ``AlignmentError`` unless both sides' spans tile the same bytes [0, n)."""
    sides = {"student": student_spans, "teacher": teacher_spans}
    breaks = {side: coverage_break(spans) for side, spans in sides.items()}
    lengths = {side: int(spans[-1, 1]) if len(spans) else 0 for side, spans in sides.items()}
    if all(offset is None for offset in breaks.values()) and lengths["student"] == lengths["teacher"]:
        return
    broken = [offset for offset in breaks.values() if offset is not None]
    diverge = min(broken) if broken else min(lengths.values())
    covered = {
        side: f"[0, {lengths[side]})" if breaks[side] is None else f"[0, {breaks[side]}), then a gap" for side in sides
    }
    raise AlignmentError(
        f"example {example!r}: the student's and the teacher's tokens do not cover the same bytes, they diverge at "
        f"byte {diverge} (the student's spans cover {covered['student']}, the teacher's {covered['teacher']})"
    )


def predicting_positions(starts: Tensor, response_start: int) -> Tensor:
    """Sequence positions whose logits predict the tokens at response indices ``starts``
    (position i predicts token i + 1). Raises ``ValueError`` when the response starts the
    sequence, so its first token has no position predicting it."""
    if response_start < 1:
        raise ValueError("the response's first token starts the sequence, so no position predicts it: give a prefix")
    return starts + (response_start - 1)


@dataclass(frozen=True)
class GroupBatch:
    """The groups of a batch of responses, flattened: positions index the batch's logits
    flattened to ``[rows × length, V]`` (row r, position i → r × length + i)."""

    student_positions: Tensor  # [G_total] the position predicting each group's first student token
    teacher_positions: Tensor  # [G_total]
    student_sizes: Tensor  # [G_total]
    teacher_sizes: Tensor  # [G_total]
    example_index: Tensor  # [G_total] the row each group comes from


def batch_groups(
    alignments: Sequence[Alignment],
    student_response_starts: Sequence[int],
    teacher_response_starts: Sequence[int],
    student_length: int,
    teacher_length: int,
) -> GroupBatch:
    """Concatenate the groups of each row's alignment, with each row's response start in
    its (padded) sequences of ``student_length`` and ``teacher_length`` tokens."""
    student_positions, teacher_positions, rows = [], [], []
    for row, (alignment, student_start, teacher_start) in enumerate(
        zip(alignments, student_response_starts, teacher_response_starts, strict=True)
    ):
        student_positions.append(predicting_positions(alignment.student_starts, student_start) + row * student_length)
        teacher_positions.append(predicting_positions(alignment.teacher_starts, teacher_start) + row * teacher_length)
        rows.append(torch.full((len(alignment),), row, dtype=torch.long))
    empty = torch.zeros(0, dtype=torch.long)
    return GroupBatch(
        student_positions=torch.cat(student_positions) if rows else empty,
        teacher_positions=torch.cat(teacher_positions) if rows else empty,
        student_sizes=torch.cat([alignment.student_sizes for alignment in alignments]) if rows else empty,
        teacher_sizes=torch.cat([alignment.teacher_sizes for alignment in alignments]) if rows else empty,
        example_index=torch.cat(rows) if rows else empty,
    )
