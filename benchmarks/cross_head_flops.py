"""Matmul FLOPs of the cross-tokenizer group head per training step, ``loss_impl=fused`` against ``eager``.

The head (``kd_lightning.cross_tokenizer.CrossTokenizerHead``) turns each aligned group's
final hidden states into both sides' logits and the objective, forward and backward. The
eager head checkpoints each chunk, so its backward pass computes the teacher's and the
student's logits again; the fused head computes the gradients in its forward pass. Counted
by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls only, in-place ``addmm_`` included; the objectives' elementwise
work and sorts are not counted), so the figures are exact and do not depend on the machine
or its load. Hidden states and weights are random: FLOPs depend on the shapes only.

The defaults are the study's cross-tokenizer arms: the SmolLM2 student (H = 576,
V = 49,152), the Qwen2.5-Coder-1.5B-Instruct teacher (H = 1,536, V = 151,936, read from the
teacher cache as hidden states, so its body costs nothing here), and 246 groups per step
(the mean of ``selection/kept_tokens`` over `hybrid-fkl-tau2` seed 0's steps). The objective
is ``hybrid`` (FKL): ``uld`` and ``gold`` run the same matmuls. Every group is one token on
each side: the later positions of ``gold`` cost the same in both heads.

    python benchmarks/cross_head_flops.py      # → benchmarks/results/cross_head_flops.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning import losses
from kd_lightning.cross_tokenizer import CrossTokenizerHead, GroupStates
from kd_lightning.heads import GlobalMean
from kd_lightning.tokens import TokenBatch
from kd_lightning.vocabulary import VocabularyMatch

RESULTS = Path(__file__).parent / "results"


def in_place_addmm_flops(accumulator, first, second, **_) -> int:
    """``accumulator.addmm_(first, second)``: 2·m·k·n, as the counter's own ``addmm``."""
    return 2 * first[0] * first[1] * second[1]


def head_flops(loss_impl: str, shapes: argparse.Namespace) -> int:
    """Matmul FLOPs of one forward and backward pass of the head over ``shapes.groups`` groups."""
    generator = torch.Generator().manual_seed(0)
    matched = min(shapes.student_vocabulary, shapes.teacher_vocabulary) // 2
    match = VocabularyMatch(torch.randperm(shapes.teacher_vocabulary, generator=generator)[:matched],
                            torch.randperm(shapes.student_vocabulary, generator=generator)[:matched],
                            shapes.teacher_vocabulary, shapes.student_vocabulary, 0, 0)
    student_head = nn.Linear(shapes.student_hidden, shapes.student_vocabulary, bias=False)
    teacher_head = nn.Linear(shapes.teacher_hidden, shapes.teacher_vocabulary, bias=False).requires_grad_(False)
    states = GroupStates(torch.randn(shapes.groups, shapes.student_hidden, requires_grad=True),
                         torch.randn(shapes.groups, shapes.teacher_hidden),
                         torch.zeros(0, shapes.student_hidden), torch.zeros(0, dtype=torch.long))
    objective = losses.cross_tokenizer.objective("hybrid", losses.get("fkl"))
    head = CrossTokenizerHead(objective, match, states, 0.0, student_head, teacher_head, shapes.chunk_size,
                              student_weight=student_head.weight if loss_impl == "fused" else None)
    tokens = TokenBatch(torch.ones(shapes.groups), torch.ones(shapes.groups, dtype=torch.bool), 0, head.difficulty)
    weights = tokens.loss_weights(True)
    # the fused head accumulates its weight gradient in place (addmm_), which the counter does not know
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: in_place_addmm_flops}) as counter:
        per_group, _ = head.kept_losses(tokens, weights, GlobalMean(1, torch.tensor(shapes.groups), torch.tensor(1)))
        (weights * per_group).sum().backward()
    return counter.get_total_flops()


def report(eager: int, fused: int, shapes: argparse.Namespace, command: str) -> str:
    lines = ["# Matmul FLOPs of the cross-tokenizer group head per step (benchmarks/cross_head_flops.py)", "",
             f"`{command}`: {shapes.groups} groups; student H = {shapes.student_hidden}, V = {shapes.student_vocabulary:,}; "
             f"teacher H = {shapes.teacher_hidden}, V = {shapes.teacher_vocabulary:,}. Counted, not timed.", "",
             "| `eager` (checkpointed), GFLOP | `fused`, GFLOP | fused / eager |", "|---:|---:|---:|",
             f"| {eager / 1e9:.1f} | {fused / 1e9:.1f} | {fused / eager:.2f} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for option, default in (("groups", 246), ("student-hidden", 576), ("student-vocabulary", 49152),
                            ("teacher-hidden", 1536), ("teacher-vocabulary", 151936), ("chunk-size", 256)):
        parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=RESULTS / "cross_head_flops.md")
    shapes = parser.parse_args()
    text = report(head_flops("eager", shapes), head_flops("fused", shapes), shapes, "python benchmarks/cross_head_flops.py " + " ".join(sys.argv[1:]))
    shapes.out.parent.mkdir(parents=True, exist_ok=True)
    shapes.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
