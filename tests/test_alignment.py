"""Byte spans and alignment of two tokenisations (SPEC §6), against slow, obvious loops,
on real tokenizers of different families."""

import itertools
import random

import pytest
import torch
from tokenizers import processors
from real_tokenizers import (  # noqa: F401 (real_tokenizer: a fixture)
    TOKENIZERS,
    gpt2_tokenizer,
    random_texts,
    real_tokenizer,
    reference_spans,
)

from kd_lightning.alignment import (
    AlignmentError,
    align,
    align_spans,
    batch_groups,
    groups_within,
    predicting_positions,
    response_tokens,
)

PROMPT = "<|user|>Write something.\n<|assistant|>\n"


@pytest.mark.parametrize("prefix", [PROMPT, ""], ids=["after-prompt", "alone"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_byte_spans_are_the_bytes_each_token_stands_for(real_tokenizer, name, prefix):
    tokenizer, byte_level = real_tokenizer(name), TOKENIZERS[name][1]
    for text in random_texts(25, seed=1):
        tokens = response_tokens(tokenizer, text, prefix)
        assert tokens.byte_spans.tolist() == reference_spans(tokenizer, text, prefix, byte_level), text
        assert tokens.response == text.encode("utf-8")
        assert len(tokens.response_ids) == len(tokens.byte_spans)


def test_a_character_split_across_tokens_is_shared_out_by_its_bytes(real_tokenizer):
    # GPT-2 splits 世 (3 bytes) into ä¸ + ĸ and 界 into çķ + Į; offsets name the whole character
    tokens = response_tokens(real_tokenizer("gpt2"), "世界", PROMPT)
    assert tokens.byte_spans.tolist() == [[0, 2], [2, 3], [3, 5], [5, 6]]
    # byte fallback: one <0xNN> piece per byte of the emoji, after the space
    tokens = response_tokens(real_tokenizer("sentencepiece"), " 🙂", PROMPT)
    assert tokens.byte_spans.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]


def test_sentencepiece_virtual_space_takes_no_bytes(real_tokenizer):
    tokenizer = real_tokenizer("sentencepiece")
    tokens = response_tokens(tokenizer, "世 the")
    assert tokenizer.convert_ids_to_tokens(tokens.response_ids)[:4] == ["▁", "<0xE4>", "<0xB8>", "<0x96>"]
    assert tokens.byte_spans.tolist()[:4] == [[0, 0], [0, 1], [1, 2], [2, 3]]


def test_a_token_crossing_from_the_prefix_is_the_first_response_token(real_tokenizer):
    tokenizer = real_tokenizer("llama3")
    tokens = response_tokens(tokenizer, "Héllo there", "Assistant:")
    assert tokenizer.convert_ids_to_tokens(tokens.response_ids)[0] == ":H"
    assert tokens.crosses_prefix and tokens.byte_spans.tolist() == [[0, 1], [1, 4], [4, 6], [6, 12]]
    assert not response_tokens(tokenizer, "Héllo there", "Assistant:\n").crosses_prefix


def test_offsets_trimmed_of_whitespace_give_the_same_spans(real_tokenizer):
    # RoBERTa-style ByteLevel post-processing trims spaces off the offsets: 'Ġ' alone gets (9, 9)
    trimming = gpt2_tokenizer()
    trimming.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    for text in random_texts(25, seed=5):
        expected = response_tokens(real_tokenizer("gpt2"), text, PROMPT).byte_spans
        assert torch.equal(response_tokens(trimming, text, PROMPT).byte_spans, expected), text


def test_an_empty_response_has_no_tokens_and_aligns_to_the_end_markers(real_tokenizer):
    student = response_tokens(real_tokenizer("gpt2"), "", PROMPT)
    teacher = response_tokens(real_tokenizer("sentencepiece"), "", PROMPT)
    assert student.byte_spans.shape == (0, 2) and student.response_start == len(student.input_ids)
    alignment = align(student, teacher)
    assert len(alignment) == 1 and alignment.student_starts.tolist() == alignment.teacher_starts.tolist() == [0]


def reference_alignment(student_spans, teacher_spans):
    """Groups straight from the definition: a token belongs to the group numbered by how
    many common boundaries (> 0) lie before its end; the end markers close the list."""
    student_ends, teacher_ends = [end for _, end in student_spans], [end for _, end in teacher_spans]
    common = sorted((set(student_ends) & set(teacher_ends)) - {0})
    student_groups = [sum(1 for boundary in common if boundary < end) for end in student_ends] + [len(common)]
    teacher_groups = [sum(1 for boundary in common if boundary < end) for end in teacher_ends] + [len(common)]
    return student_groups, teacher_groups, common + [student_ends[-1] if student_ends else 0]


def check_against_reference(student_spans, teacher_spans):
    alignment = align_spans(torch.tensor(student_spans).reshape(-1, 2), torch.tensor(teacher_spans).reshape(-1, 2))
    student_groups, teacher_groups, byte_ends = reference_alignment(student_spans, teacher_spans)
    assert alignment.student_groups.tolist() == student_groups
    assert alignment.teacher_groups.tolist() == teacher_groups
    assert alignment.byte_ends.tolist() == byte_ends
    for group in range(len(alignment)):
        student_members = [k for k, g in enumerate(student_groups) if g == group]
        teacher_members = [k for k, g in enumerate(teacher_groups) if g == group]
        student_first, teacher_first = int(alignment.student_starts[group]), int(alignment.teacher_starts[group])
        assert student_members == list(range(student_first, student_first + int(alignment.student_sizes[group])))
        assert teacher_members == list(range(teacher_first, teacher_first + int(alignment.teacher_sizes[group])))
        first_student, first_teacher = student_members[0], teacher_members[0]
        if first_student < len(student_spans) and first_teacher < len(teacher_spans):
            # both sides have read the same bytes where the group's first token is predicted
            assert student_spans[first_student][0] == teacher_spans[first_teacher][0]
    return alignment


FAMILIES = ["gpt2", "llama3", "smollm2", "sentencepiece"]


@pytest.mark.parametrize("student_name, teacher_name", list(itertools.permutations(FAMILIES, 2)))
def test_alignment_of_real_tokenizers_matches_the_definition(real_tokenizer, student_name, teacher_name):
    student, teacher = real_tokenizer(student_name), real_tokenizer(teacher_name)
    for index, text in enumerate(random_texts(20, seed=2)):
        student_tokens, teacher_tokens = response_tokens(student, text, PROMPT), response_tokens(teacher, text, PROMPT)
        alignment = align(student_tokens, teacher_tokens, example=str(index))
        check_against_reference(student_tokens.byte_spans.tolist(), teacher_tokens.byte_spans.tolist())
        assert alignment.student_sizes.min() >= 1 and alignment.teacher_sizes.min() >= 1
        assert alignment.student_sizes[-1] == 1 and alignment.teacher_sizes[-1] == 1  # the end markers


def random_tiling(generator, length, zero_width_share=0.1):
    ends = sorted(generator.sample(range(1, length), generator.randint(0, length - 1))) + [length]
    spans, start = [], 0
    for end in ends:
        if generator.random() < zero_width_share:
            spans.append([start, start])
        spans.append([start, end])
        start = end
    return spans


def test_alignment_of_random_spans_matches_the_definition():
    generator = random.Random(3)
    for _ in range(300):
        length = generator.randint(1, 40)
        check_against_reference(random_tiling(generator, length), random_tiling(generator, length))
    check_against_reference([], [])  # an empty response: the end markers alone


def test_a_response_cut_at_a_common_boundary_keeps_its_leading_groups():
    generator = random.Random(6)
    for _ in range(100):
        length = generator.randint(1, 30)
        student_spans, teacher_spans = random_tiling(generator, length), random_tiling(generator, length)
        full = align_spans(torch.tensor(student_spans), torch.tensor(teacher_spans))
        student_budget = generator.randint(0, len(student_spans) + 1)
        teacher_budget = generator.randint(0, len(teacher_spans) + 1)
        count = groups_within(full, student_budget, teacher_budget)
        cut = full.first_groups(count)
        assert int(cut.student_sizes.sum()) <= student_budget and int(cut.teacher_sizes.sum()) <= teacher_budget
        if count == len(full):
            continue
        # one more group would not fit on one side at least
        student_needs, teacher_needs = int(full.student_sizes[: count + 1].sum()), int(full.teacher_sizes[: count + 1].sum())
        assert student_needs > student_budget or teacher_needs > teacher_budget
        # the response cut at that group's boundary aligns to the same leading groups
        end = int(full.byte_ends[count - 1]) if count else 0
        student_kept = torch.tensor([span for span in student_spans if span[1] <= end]).reshape(-1, 2)
        teacher_kept = torch.tensor([span for span in teacher_spans if span[1] <= end]).reshape(-1, 2)
        realigned = align_spans(student_kept, teacher_kept).first_groups(count)
        for field in ("student_starts", "student_sizes", "teacher_starts", "teacher_sizes", "byte_ends"):
            assert torch.equal(getattr(realigned, field), getattr(cut, field)), field


@pytest.mark.parametrize("name", ["gpt2", "llama3", "smollm2", "sentencepiece"])
def test_the_same_tokenizer_on_both_sides_gives_one_token_groups(real_tokenizer, name):
    tokenizer = real_tokenizer(name)
    for text in random_texts(20, seed=4):
        tokens = response_tokens(tokenizer, text, PROMPT)
        alignment = align(tokens, tokens)
        assert len(alignment) == len(tokens.response_ids) + 1
        assert alignment.student_sizes.eq(1).all() and alignment.teacher_sizes.eq(1).all()
        assert torch.equal(alignment.student_starts, torch.arange(len(alignment)))


def test_responses_that_differ_are_refused_naming_the_example_and_the_byte(real_tokenizer):
    student = response_tokens(real_tokenizer("gpt2"), "The answer is 42.", PROMPT)
    teacher = response_tokens(real_tokenizer("llama3"), "The answer is 42!", PROMPT)
    with pytest.raises(AlignmentError, match=r"example 'dolly\[7\]'.*from byte 16"):
        align(student, teacher, example="dolly[7]")
    shorter = response_tokens(real_tokenizer("llama3"), "The answer", PROMPT)
    with pytest.raises(AlignmentError, match="from byte 10"):
        align(student, shorter, example="x")


def test_spans_that_do_not_cover_the_same_bytes_name_the_first_diverging_byte():
    tiling = torch.tensor([[0, 3], [3, 5], [5, 9]])
    with pytest.raises(AlignmentError, match=r"example 'row 3'.*diverge at byte 5"):
        align_spans(tiling, torch.tensor([[0, 3], [3, 5], [6, 9]]), example="row 3")
    with pytest.raises(AlignmentError, match="diverge at byte 7"):
        align_spans(tiling, torch.tensor([[0, 3], [3, 7]]))


class SlowTokenizer:
    is_fast = False


class OffsetlessTokenizer:
    is_fast = True

    def __call__(self, text, **kwargs):
        return {"input_ids": [5, 6], "offset_mapping": [(0, 0), (0, 0)]}


def test_a_tokenizer_without_offsets_is_refused_naming_it():
    with pytest.raises(TypeError, match="SlowTokenizer is not a fast tokenizer.*use_fast=True"):
        response_tokens(SlowTokenizer(), "hello")
    with pytest.raises(TypeError, match=r"OffsetlessTokenizer gives every token the character offsets \(0, 0\)"):
        response_tokens(OffsetlessTokenizer(), "hello")


def test_batched_groups_index_the_flattened_logits(real_tokenizer):
    student, teacher = real_tokenizer("gpt2"), real_tokenizer("sentencepiece")
    rows = [("世界 ok", "A: "), ("the end", "Q: hi\nA: ")]
    student_rows = [response_tokens(student, text, prefix) for text, prefix in rows]
    teacher_rows = [response_tokens(teacher, text, prefix) for text, prefix in rows]
    alignments = [align(s, t) for s, t in zip(student_rows, teacher_rows)]
    student_starts, teacher_starts = [r.response_start for r in student_rows], [r.response_start for r in teacher_rows]
    batch = batch_groups(alignments, student_starts, teacher_starts, 20, 30)
    assert batch.example_index.tolist() == [0] * len(alignments[0]) + [1] * len(alignments[1])
    first = alignments[1]
    expected = predicting_positions(first.student_starts, student_rows[1].response_start) + 20
    assert torch.equal(batch.student_positions[len(alignments[0]) :], expected)
    # the position predicting the response's first token is the prompt's last
    assert batch.teacher_positions[0] == teacher_rows[0].response_start - 1
    with pytest.raises(ValueError, match="no position predicts it"):
        predicting_positions(first.student_starts, 0)
