"""The vocabulary match (SPEC §6): ids standing for the same bytes, checked against a
plain decoding of every piece, on real tokenizers of different families."""

import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from real_tokenizers import TOKENIZERS, real_tokenizer, reference_piece_bytes  # noqa: F401 (real_tokenizer: a fixture)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kd_lightning.vocabulary import match_vocabularies

#: the Qwen2.5-Coder-0.5B-Instruct GGUF file as MODELS.md assembles it (not in CI)
QWEN_GGUF = Path("/root/models/qwen0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def reference_bytes(tokenizer, byte_level):
    """Every id's bytes decoded one by one (``None`` for a special token)."""
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    special |= set(tokenizer.all_special_ids)
    added = tokenizer.added_tokens_decoder
    decoded = {}
    for piece, index in tokenizer.get_vocab().items():
        if index in special:
            decoded[index] = None
        elif index in added:
            decoded[index] = added[index].content.encode("utf-8")
        else:
            decoded[index] = reference_piece_bytes(piece, byte_level)
    return decoded


def end_marker(tokenizer):
    """The end-of-turn marker where the tokenizer has one, else EOS."""
    vocabulary = tokenizer.get_vocab()
    return vocabulary["<|im_end|>"] if "<|im_end|>" in vocabulary else tokenizer.eos_token_id


def check_match(teacher_name, student_name, real_tokenizer):
    teacher, student = real_tokenizer(teacher_name), real_tokenizer(student_name)
    teacher_end, student_end = end_marker(teacher), end_marker(student)
    match = match_vocabularies(teacher, student, teacher_end, student_end)
    teacher_ids, student_ids = match.teacher_ids.tolist(), match.student_ids.tolist()
    assert match.teacher_ids.dtype == match.student_ids.dtype == torch.long
    assert len(set(teacher_ids)) == len(teacher_ids) == len(set(student_ids)) == len(student_ids)
    assert (teacher_ids[-1], student_ids[-1]) == (teacher_end, student_end)
    teacher_bytes = reference_bytes(teacher, TOKENIZERS[teacher_name][1])
    student_bytes = reference_bytes(student, TOKENIZERS[student_name][1])
    for teacher_id, student_id in zip(teacher_ids[:-1], student_ids[:-1]):
        assert teacher_bytes[teacher_id] == student_bytes[student_id] is not None
    # as many pairs for each byte string as the side with fewer ids for it has
    teacher_counts = Counter(b for b in teacher_bytes.values() if b)
    student_counts = Counter(b for b in student_bytes.values() if b)
    matched = Counter(teacher_bytes[teacher_id] for teacher_id in teacher_ids[:-1])
    assert matched == {b: min(count, student_counts[b]) for b, count in teacher_counts.items() if b in student_counts}
    return match


@pytest.mark.parametrize(
    "teacher_name, student_name", [("smollm2", "sentencepiece_normalizer"), ("gpt2", "sentencepiece")]
)
def test_matched_ids_stand_for_the_same_bytes(real_tokenizer, teacher_name, student_name):
    match = check_match(teacher_name, student_name, real_tokenizer)
    summary = match.summary()
    assert summary["matched"] == len(match) > 1
    assert summary["teacher_unmatched"] == summary["teacher_vocabulary"] - len(match)


@pytest.mark.slow
@pytest.mark.parametrize(
    "teacher_name, student_name",
    [("smollm2", "gpt2"), ("smollm2", "llama3"), ("llama3", "gpt2"), ("llama3", "sentencepiece")],
)
def test_matched_ids_of_large_vocabularies_stand_for_the_same_bytes(real_tokenizer, teacher_name, student_name):
    check_match(teacher_name, student_name, real_tokenizer)


def test_spellings_differ_where_the_bytes_agree(real_tokenizer):
    teacher, student = real_tokenizer("sentencepiece"), real_tokenizer("gpt2")
    match = match_vocabularies(teacher, student, teacher.eos_token_id, student.eos_token_id)
    teacher_pieces = teacher.convert_ids_to_tokens(match.teacher_ids.tolist())
    pairs = dict(zip(teacher_pieces, student.convert_ids_to_tokens(match.student_ids.tolist())))
    assert pairs["▁the"] == "Ġthe"
    assert pairs["<0xE4>"] == "ä" and pairs["<0xC3>"] == "Ã"
    assert pairs["</s>"] == "<|endoftext|>"
    # "\n" and "<0x0A>" both stand for b"\n", as "a" and "<0x61>" for b"a": the regular piece pairs first
    assert pairs["\n"] == "Ċ" and "<0x0A>" not in pairs
    assert pairs["a"] == "a" and "<0x61>" not in pairs
    assert "<unk>" not in pairs and "<s>" not in pairs


@pytest.mark.parametrize("name", ["smollm2", "sentencepiece", "sentencepiece_normalizer"])
def test_the_same_tokenizer_on_both_sides_is_matched_to_itself(real_tokenizer, name):
    tokenizer = real_tokenizer(name)
    end = end_marker(tokenizer)
    match = match_vocabularies(tokenizer, tokenizer, end, end)
    assert torch.equal(match.teacher_ids, match.student_ids)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    special |= set(tokenizer.all_special_ids)
    assert set(match.teacher_ids.tolist()) == (set(range(len(tokenizer))) - special) | {end}


def tiny_sentencepiece(pieces, decoder=None):
    """A word-level tokenizer over ``pieces`` with Metaspace spaces (or ``decoder``)."""
    vocabulary = {"<unk>": 0, **{piece: index + 1 for index, piece in enumerate(pieces)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoder or decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")


def test_vocabularies_with_nothing_in_common_are_refused():
    teacher, student = tiny_sentencepiece(["▁cat", "dog"]), tiny_sentencepiece(["▁car", "do"])
    with pytest.raises(ValueError, match="the vocabulary match is empty"):
        match_vocabularies(teacher, student, 0, 0)


def test_a_tokenizer_of_unknown_bytes_is_refused_naming_its_decoder():
    word_piece = tiny_sentencepiece(["cat", "##s"], decoder=decoders.WordPiece())
    with pytest.raises(ValueError, match=rf"{type(word_piece).__name__} stand for: its decoder is .*WordPiece"):
        match_vocabularies(word_piece, tiny_sentencepiece(["▁cat"]), 0, 0)


@pytest.mark.slow
def test_qwen_and_smollm2_match_within_seconds(real_tokenizer):
    if not QWEN_GGUF.is_file():
        pytest.skip(f"no {QWEN_GGUF} (assemble it as MODELS.md says)")
    from kd_lightning.models import load_tokenizer

    qwen = load_tokenizer(str(QWEN_GGUF.parent), gguf_file=QWEN_GGUF.name)
    smollm2 = real_tokenizer("smollm2")
    started = time.perf_counter()
    match = match_vocabularies(qwen, smollm2, end_marker(qwen), end_marker(smollm2))
    assert time.perf_counter() - started < 10
    assert len(match) > 30_000
    identity = match_vocabularies(qwen, qwen, end_marker(qwen), end_marker(qwen))
    assert torch.equal(identity.teacher_ids, identity.student_ids)
