"""The bytes a token stands for, and the match between two vocabularies (SPEC §6).

A token *stands for* the UTF-8 bytes it puts into the text, not for its spelling:

- ByteLevel BPE (GPT-2, Llama 3, Qwen, SmolLM2): each character of the piece is one
  byte through the GPT-2 byte alphabet, so ``Ġthe`` stands for ``b" the"``.
- SentencePiece / Metaspace (Llama 2, Gemma): ``▁`` is a space, so ``▁the`` stands for
  ``b" the"``; with byte fallback, ``<0x0A>`` stands for ``b"\\n"``.
- A non-special added token stands for its literal text; a special token (an added token
  flagged special, or one of the tokenizer's named special tokens) stands for no bytes.

The vocabulary match M is the list of pairs (teacher id, student id) that stand for the
same bytes, plus the pair of the two sides' end-of-response markers. It is one-to-one:
when several ids of one side stand for the same bytes (``<0x41>`` and ``A`` in a
SentencePiece vocabulary), each side's ids for those bytes are ranked — regular pieces
first, then byte-fallback pieces, then added tokens, lower id first within a rank — and
paired in rank order; ids left over stay unmatched. With the same tokenizer on both
sides M is therefore the identity on every id that stands for bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerBase

#: SentencePiece's stand-in for a space
METASPACE = "\u2581"
#: a byte-fallback piece, ``<0x0A>``
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: ranks of the ids standing for the same bytes (lower pairs first)
REGULAR_PIECE, BYTE_FALLBACK_PIECE, ADDED_TOKEN = 0, 1, 2


@lru_cache(maxsize=1)
def byte_level_decoding() -> dict[int, str]:
    """A ``str.translate`` table from GPT-2's byte alphabet to the Latin-1 character of
    each byte; any other character below U+0100 goes to U+FFFF, which Latin-1 refuses."""
    # the ByteLevel alphabet: printable bytes stand for themselves, the others are shifted
    # past U+0100 in byte order (GPT-2's bytes_to_unicode, as the tokenizers library builds it)
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table = {code: "\uffff" for code in range(256) if code not in printable}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[256 + shifted] = chr(byte)
            shifted += 1
    assert {chr(code) for code, value in table.items() if value != "\uffff"} == set(pre_tokenizers.ByteLevel.alphabet())
    return table


def decoder_description(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The backend decoder's configuration as JSON (``{}`` when the tokenizer has none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return json.loads(decoder.__getstate__()) if decoder is not None else {}


def piece_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes | None]:
    """A function from a piece of ``tokenizer``'s model vocabulary to the bytes it stands
    for (``None`` for a piece that stands for no bytes), chosen from its decoder.

    Raises ``ValueError`` naming the tokenizer class and its decoder when that decoder is
    neither ByteLevel nor SentencePiece-like (``▁`` for spaces).
    """
    description = json.dumps(decoder_description(tokenizer), ensure_ascii=False)
    if '"ByteLevel"' in description:
        return decode_byte_level_piece
    if METASPACE in description:
        return decode_sentencepiece_piece
    raise ValueError(
        f"cannot tell which bytes the tokens of {type(tokenizer).__name__} stand for: its decoder is "
        f"{description or 'missing'}; byte spans and vocabulary matching support ByteLevel BPE and "
        "SentencePiece-style (▁ for spaces, <0xNN> byte fallback) tokenizers"
    )


def decode_byte_level_piece(piece: str) -> bytes | None:
    """A ByteLevel piece's bytes; ``None`` when it holds a character outside the alphabet."""
    try:
        return piece.translate(byte_level_decoding()).encode("latin-1")
    except UnicodeEncodeError:
        return None


def decode_sentencepiece_piece(piece: str) -> bytes:
    """A SentencePiece piece's bytes: ``▁`` is a space, ``<0xNN>`` the byte NN."""
    byte = BYTE_PIECE.fullmatch(piece)
    if byte is not None:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(METASPACE, " ").encode("utf-8")


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids that stand for no bytes: added tokens flagged special and named special tokens."""
    flagged = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return flagged | set(tokenizer.all_special_ids)


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> dict[int, tuple[bytes, int]]:
    """Every id of ``tokenizer`` that stands for bytes → (those bytes, its rank: regular
    piece, byte-fallback piece or added token). Special ids are left out."""
    decode, skipped, added = piece_decoder(tokenizer), special_ids(tokenizer), tokenizer.added_tokens_decoder
    table = {}
    for piece, index in tokenizer.get_vocab().items():
        entry = bytes_of_token(piece, index, decode, skipped, added)
        if entry is not None:
            table[index] = entry
    return table


def bytes_of_token(
    piece: str, index: int, decode: Callable[[str], bytes | None], skipped: set[int], added: dict
) -> tuple[bytes, int] | None:
    """The bytes token ``index`` (spelt ``piece``) stands for and its rank, or ``None``
    for a special token or a piece that decodes to nothing."""
    if index in skipped:
        return None
    if index in added:  # an added token's content is literal text (▁ a space where the normalizer made it one)
        content = added[index].content
        if decode is decode_sentencepiece_piece:
            content = content.replace(METASPACE, " ")
        return content.encode("utf-8"), ADDED_TOKEN
    decoded = decode(piece)
    if not decoded:
        return None
    return decoded, BYTE_FALLBACK_PIECE if BYTE_PIECE.fullmatch(piece) else REGULAR_PIECE


def byte_lengths(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int | None]:
    """How many bytes each of ``ids`` stands for (0 for a special token, ``None`` for a
    piece whose bytes are unknown)."""
    decode, skipped, added = piece_decoder(tokenizer), special_ids(tokenizer), tokenizer.added_tokens_decoder
    lengths = []
    for piece, index in zip(tokenizer.convert_ids_to_tokens(ids), ids):
        entry = bytes_of_token(piece, index, decode, skipped, added)
        lengths.append(0 if index in skipped else None if entry is None else len(entry[0]))
    return lengths


def ids_by_bytes(table: dict[int, tuple[bytes, int]]) -> dict[bytes, list[int]]:
    """Bytes → the ids standing for them, in pairing order (rank, then id)."""
    grouped: dict[bytes, list[tuple[int, int]]] = {}
    for index, (decoded, rank) in table.items():
        grouped.setdefault(decoded, []).append((rank, index))
    return {decoded: [index for _, index in sorted(ranked)] for decoded, ranked in grouped.items()}


@dataclass(frozen=True)
class VocabularyMatch:
    """M: ``teacher_ids[k]`` and ``student_ids[k]`` stand for the same bytes (the last pair
    is the end markers'). Both are int64 ``[len(M)]``, sorted by teacher id apart from the
    end markers' pair; each id appears at most once."""

    teacher_ids: Tensor
    student_ids: Tensor
    teacher_vocabulary: int  # ids of the teacher tokenizer (len(tokenizer))
    student_vocabulary: int
    teacher_without_bytes: int  # special ids (end marker included) and undecodable pieces
    student_without_bytes: int

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def summary(self) -> dict[str, int]:
        """Counts: matched pairs, and each side's vocabulary, ids without bytes and unmatched ids."""
        return {
            "matched": len(self),
            "teacher_vocabulary": self.teacher_vocabulary,
            "student_vocabulary": self.student_vocabulary,
            "teacher_without_bytes": self.teacher_without_bytes,
            "student_without_bytes": self.student_without_bytes,
            "teacher_unmatched": self.teacher_vocabulary - len(self),
            "student_unmatched": self.student_vocabulary - len(self),
        }


def match_vocabularies(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_end_id: int,
    student_end_id: int,
) -> VocabularyMatch:
    """M between the two tokenizers' vocabularies (see the module docstring): ids standing
    for the same bytes, and the end-of-response markers (EOS or end-of-turn) paired.

    Raises ``ValueError`` when no id pair stands for the same bytes (M would hold only
    the end markers), naming both tokenizer classes and how many ids each side decoded.
    """
    teacher_table, student_table = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    teacher_by_bytes, student_by_bytes = ids_by_bytes(teacher_table), ids_by_bytes(student_table)
    pairs = []
    for decoded in teacher_by_bytes.keys() & student_by_bytes.keys():
        pairs.extend(zip(teacher_by_bytes[decoded], student_by_bytes[decoded]))
    if not pairs:
        raise ValueError(
            f"no token of the teacher's {type(teacher_tokenizer).__name__} ({len(teacher_table)} ids decoded) "
            f"stands for the same bytes as a token of the student's {type(student_tokenizer).__name__} "
            f"({len(student_table)} ids decoded): the vocabulary match is empty"
        )
    pairs.sort()
    # an end marker is special by definition, but guard against one that also decodes to text
    pairs = [(t, s) for t, s in pairs if t != teacher_end_id and s != student_end_id]
    pairs.append((teacher_end_id, student_end_id))
    teacher_ids, student_ids = torch.tensor(pairs, dtype=torch.long).T.contiguous()
    return VocabularyMatch(
        teacher_ids=teacher_ids,
        student_ids=student_ids,
        teacher_vocabulary=len(teacher_tokenizer),
        student_vocabulary=len(student_tokenizer),
        teacher_without_bytes=len(teacher_tokenizer) - len(teacher_table),
        student_without_bytes=len(student_tokenizer) - len(student_table),
    )
