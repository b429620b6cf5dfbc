"""Cost of the ``sample_answers`` callback on the default run.

Trains a few steps of the default recipe (SmolLM2-135M-Instruct teacher → 10-layer copy,
FKL, batches of 4 Dolly examples ≤ 256 tokens, no sample answers), then times, in the same
process, what the callback generates: the teacher's answers (once per run) and the
student's (at the start, every ``every_n_steps`` and at the end), greedy, to the callback's
prompts (4 Dolly test instructions, ≤ 64 new tokens), each ``--repeats`` times:

    python benchmarks/sample_answers_cost.py        # → benchmarks/results/sample_answers_cost_cpu.md
    python benchmarks/sample_answers_cost.py --steps 3 --repeats 1 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from policy_cost import RESULTS, timed_fit

from kd_lightning.callbacks import SampleAnswers
from kd_lightning.precision import cpu_description

DEFAULT_RUN_STEPS = 80  # model=smollm2's budget (conf/experiment/budget/smollm2.yaml)


def generation_seconds(trainer, repeats: int, callback: SampleAnswers) -> dict[str, float]:
    """The median seconds of one round of answers per role, rounds of the two roles interleaved."""
    module, tokenizer = trainer.lightning_module, trainer.datamodule.tokenizer
    callback.load_prompts(tokenizer)
    seconds = {"teacher": [], "student": []}
    for _ in range(repeats):
        for role, timings in seconds.items():
            started = time.perf_counter()
            callback.answers(getattr(module, role), tokenizer)
            timings.append(time.perf_counter() - started)
    return {role: statistics.median(timings) for role, timings in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_answers_cost_cpu.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        step, trainer = timed_fit([], args.steps, Path(scratch) / "run")
        callback = SampleAnswers(scratch)  # the settings of callbacks.sample_answers
        generation = generation_seconds(trainer, args.repeats, callback)
    teacher, student = generation["teacher"], generation["student"]
    default_run = teacher + 2 * student  # a run shorter than every_n_steps samples at its start and end
    lines = [
        "# Cost of sample answers (`callbacks.sample_answers`)",
        "",
        f"`python benchmarks/sample_answers_cost.py --steps {args.steps} --repeats {args.repeats}` on "
        f"{cpu_description()}, torch {torch.__version__}: "
        "the default recipe (SmolLM2-135M-Instruct teacher → 10-layer copy, FKL, batches of 4 Dolly examples); "
        f"training: mean over steps 2–{args.steps}; generation ({callback.num_prompts} prompts, {callback.decoding}): "
        f"median of {args.repeats}.",
        "",
        "| | seconds | × one training step |",
        "|---|---|---|",
        f"| training step | {step:.2f} | 1.00 |",
        f"| teacher's answers (once per run) | {teacher:.2f} | {teacher / step:.2f} |",
        f"| student's answers (each sampling) | {student:.2f} | {student / step:.2f} |",
        "",
        f"The default run ({DEFAULT_RUN_STEPS} steps, fewer than every_n_steps = {callback.every_n_steps}: samples at its "
        f"start and end) spends {default_run:.1f} s on sample answers, {100 * default_run / (DEFAULT_RUN_STEPS * step):.1f}% "
        f"of its {DEFAULT_RUN_STEPS} training steps; a longer run adds one student sampling per {callback.every_n_steps} "
        f"steps, {100 * student / (callback.every_n_steps * step):.2f}% of their time.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
