"""What distilling across tokenizers costs over a same-tokenizer step, and what alignment costs.

The step: on the default recipe (SmolLM2-135M-Instruct, live, → its 10-layer copy; Dolly,
batches of 4 examples ≤ 256 tokens), one optimizer step (forward, backward, AdamW) of

- ``none``: the same-tokenizer loss (FKL, τ = 1) on ``InstructionDataModule`` batches, and
  ``none-jsd`` with JSD (β = 0.5), the divergence ``gold`` computes on the matched ids;
- ``hybrid`` and ``gold``: the cross-tokenizer path on ``CrossTokenizerDataModule`` batches
  of the same examples, both sides tokenised by SmolLM2 (every group one token, the
  identity match): the same models and the same loss value as ``none`` for ``hybrid``, so
  the difference is the cross-tokenizer machinery (two tokenisations, the groups' gathers,
  the group head, GOLD's merge for ``gold``);
- ``hybrid-eager``: ``hybrid`` with ``loss_impl=eager``, whose group head is checkpointed
  (the backward pass computes both sides' logits again; ``hybrid`` computes its gradients
  in the forward pass);

interleaved case by case over the same examples in one process (medians of the timed
steps and of the per-round ratios, min–max in brackets; the first round warms up).

Alignment's own cost, per example of Dolly train, on the data side: encoding for one
tokenizer (``InstructionDataModule.encode_one``) against encoding both sides and aligning
them (``encode_cross_example``), for SmolLM2 against itself, GPT-2 and Llama 3, and the
collator's groups per batch (``GroupCollator``).

    python benchmarks/cross_tokenizer_step.py            # → benchmarks/results/cross_tokenizer_step_cpu.md
    python benchmarks/cross_tokenizer_step.py --model tiny --repeats 1 --examples 8 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from kd_lightning import DistillationModule
from kd_lightning.cross_tokenizer import CrossTokenizer, identity_match
from kd_lightning.data.cross_tokenizer import CrossTokenizerDataModule, encode_cross_example
from kd_lightning.precision import cpu_description

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from real_tokenizers import gpt2_tokenizer, llama3_tokenizer  # noqa: E402
from topk_cache import spread  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def recipe(model: str, examples: int):
    """The recipe's tokenizer, teacher, student and its examples as both kinds of batches."""
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data.max_train_examples={examples}", "data.val_size=4",
                                          "data.shuffle=false"])
    tokenizer = instantiate(cfg.model.tokenizer)
    same = instantiate(cfg.data, tokenizer=tokenizer)
    cross = instantiate(cfg.data, _target_=CrossTokenizerDataModule, tokenizer=tokenizer, teacher_tokenizer=tokenizer)
    for data in (same, cross):
        data.setup()
    teacher = instantiate(cfg.model.teacher)().eval().requires_grad_(False)
    return tokenizer, teacher, instantiate(cfg.model.student)(teacher=teacher), same, cross


def step_seconds(student, teacher, vocab_size: int, cases: dict, rounds: int) -> dict:
    """Seconds per optimizer step of each case (cross_tokenizer, divergence, batches, loss_impl), interleaved."""
    runs = {}
    for name, (cross_tokenizer, divergence, batches, loss_impl) in cases.items():
        module = DistillationModule(student=copy.deepcopy(student), teacher=teacher, divergence=divergence,
                                    vocab_size=vocab_size, cross_tokenizer=cross_tokenizer, loss_impl=loss_impl)
        runs[name] = (module.train(), torch.optim.AdamW(module.student.parameters(), lr=2e-4), batches)
    seconds = {name: [] for name in cases}
    for index in range(rounds + 1):
        for name, (module, optimizer, batches) in runs.items():
            started = time.perf_counter()
            module.training_step(batches[index], 0)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def encoding_milliseconds(student_tokenizer, same, records: list[dict]) -> dict:
    """Milliseconds per example to encode for one tokenizer, and to encode both sides and align them."""
    teachers = {"SmolLM2 (itself)": student_tokenizer, "GPT-2": gpt2_tokenizer(), "Llama 3": llama3_tokenizer()}
    found = {}
    started = time.perf_counter()
    for record in records:
        same.encode_one(record)
    found["one tokenizer (SmolLM2)"] = 1000 * (time.perf_counter() - started) / len(records)
    for name, teacher in teachers.items():
        started = time.perf_counter()
        for record in records:
            encode_cross_example(student_tokenizer, teacher, record, same.max_length)
        found[f"both sides + alignment, teacher {name}"] = 1000 * (time.perf_counter() - started) / len(records)
    return found


def collate_milliseconds(cross: CrossTokenizerDataModule, batches: int) -> float:
    examples = [cross.train_set[index] for index in range(batches * cross.batch_size)]
    started = time.perf_counter()
    for first in range(0, len(examples), cross.batch_size):
        cross.collate(examples[first : first + cross.batch_size])
    return 1000 * (time.perf_counter() - started) / batches


def report(seconds: dict, encoding: dict, collate: float, command: str) -> str:
    baseline = statistics.median(seconds["none"])
    lines = ["# Cross-tokenizer step against the same-tokenizer step (benchmarks/cross_tokenizer_step.py, CPU)", "",
             f"`{command}` on {cpu_description()}.", "",
             "| case | step, s | ratio to `none` | ratio to `none-jsd` |", "|---|---:|---:|---:|"]
    for name, values in seconds.items():
        ratios = [spread([value / base for value, base in zip(values, seconds[reference])], ".2f")
                  for reference in ("none", "none-jsd")]
        lines.append(f"| `{name}` | {spread(values, '.2f')} | {' | '.join(ratios)} |")
    lines += ["", "| data side, per example | ms | share of a `none` step (4 examples) |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.2f} | {4 * value / 1000 / baseline:.2%} |" for name, value in encoding.items()]
    lines += [f"| groups of a batch (`GroupCollator`), per batch of 4 | {collate:.2f} | {collate / 1000 / baseline:.2%} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config: smollm2 (the default recipe) or tiny (smoke test)")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per case, after one warm-up round")
    parser.add_argument("--examples", type=int, default=200, help="examples for the encoding times")
    parser.add_argument("--out", type=Path, default=RESULTS / "cross_tokenizer_step_cpu.md")
    args = parser.parse_args()
    tokenizer, teacher, student, same, cross = recipe(args.model, max(args.examples, 4 * (args.repeats + 1)))
    rounds = args.repeats + 1
    same_batches = [batch for batch, _ in zip(same.train_dataloader(), range(rounds))]
    cross_batches = [batch for batch, _ in zip(cross.train_dataloader(), range(rounds))]
    match = identity_match(len(tokenizer))
    cases = {"none": (None, "fkl", same_batches, "fused"), "none-jsd": (None, "jsd", same_batches, "fused"),
             "hybrid": (CrossTokenizer("hybrid", match), "fkl", cross_batches, "fused"),
             "hybrid-eager": (CrossTokenizer("hybrid", match), "fkl", cross_batches, "eager"),
             "gold": (CrossTokenizer("gold", match), "fkl", cross_batches, "fused")}
    seconds = step_seconds(student, teacher, len(tokenizer), cases, args.repeats)
    checked = same.checked_records(str(same.path)).select(range(args.examples))
    raw = [dict(record, record=index) for index, record in enumerate(checked)]
    text = report(seconds, encoding_milliseconds(tokenizer, same, raw), collate_milliseconds(cross, args.repeats),
                  "python benchmarks/cross_tokenizer_step.py " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
