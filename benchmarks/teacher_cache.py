"""What the teacher cache saves on the default SmolLM2 run, and what a bfloat16 teacher costs.

Four teacher sources train the same student (the default recipe: SmolLM2-135M-Instruct
→ 10-layer copy, FKL, τ = 1, batches of 4 Dolly examples ≤ 256 tokens): the live teacher
in float32 and in bfloat16, and caches of its states in float32 and bfloat16. The
optimizer steps (forward, backward, AdamW) are timed in this one process, the cases
interleaved step by step over the same batches, so that load on the machine hits every
case alike; each case's peak memory (max RSS) comes from a process of its own. Also:
the cache's build time and size per token, the break-even number of runs, and how far
each source's KD loss is from the float32 teacher's.

    python benchmarks/teacher_cache.py                   # → benchmarks/results/teacher_cache_cpu.md
    python benchmarks/teacher_cache.py --model tiny --repeats 2 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from kd_lightning import DistillationModule
from kd_lightning.cache import CachedTeacher, TeacherCacheWriter
from kd_lightning.cache_build import run_fingerprint
from kd_lightning.data.datamodule import counted_positions
from kd_lightning.precision import cpu_description

RESULTS = Path(__file__).parent / "results"
CASES = ("live fp32", "live bf16", "cache fp32", "cache bf16")


def config(model: str, teacher_dtype: str = "float32", cache_dtype: str = "float32"):
    overrides = [f"model={model}", "data.max_train_examples=64", "data.val_size=4", f"teacher_cache_dtype={cache_dtype}"]
    if model == "smollm2":
        overrides.append(f"model.teacher.dtype={teacher_dtype}")
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def parts(model: str, scratch: Path, case: str):
    """Tokenizer, data, a freshly built student and the case's teacher (live or cached)."""
    source, precision = case.split()
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    cfg = config(model, teacher_dtype=dtype if source == "live" else "float32", cache_dtype=dtype)
    tokenizer = instantiate(cfg.model.tokenizer)
    data = instantiate(cfg.data, tokenizer=tokenizer)
    data.setup()
    live_teacher = instantiate(cfg.model.teacher)()
    student = instantiate(cfg.model.student)(teacher=live_teacher)
    if source == "live":
        return tokenizer, data, student, live_teacher, None
    directory = scratch / f"cache-{dtype}"
    build_seconds = None
    if not (directory / "manifest.json").is_file():
        writer = TeacherCacheWriter(directory, run_fingerprint(cfg, tokenizer, data))
        started = time.perf_counter()
        writer.write(live_teacher, {"train": data.train_set, "validation": data.val_set}, data.collate, 4, torch.device("cpu"))
        build_seconds = time.perf_counter() - started
    return tokenizer, data, student, CachedTeacher(directory), build_seconds


def module_and_optimizer(student, teacher, vocab_size):
    module = DistillationModule(student=student, teacher=teacher, divergence="fkl", vocab_size=vocab_size)
    module.student.train()
    return module, torch.optim.AdamW(module.student.parameters(), lr=2e-4)


def step(module, optimizer, batch) -> float:
    started = time.perf_counter()
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def peak_memory(model: str, scratch: Path, case: str, steps: int) -> None:
    """Child process: build one case, then print the peak RSS (MiB) of a few training
    steps (Linux: the high-water mark is reset once the models are built, so a live
    teacher loaded only to copy the student's layers does not count)."""
    tokenizer, data, student, teacher, _ = parts(model, scratch, case)
    module, optimizer = module_and_optimizer(student, teacher, len(tokenizer))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    for batch, _ in zip(data.train_dataloader(), range(steps)):
        step(module, optimizer, batch)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"peak_mib": int(status["VmHWM"].split()[0]) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config: smollm2 (the default run) or tiny (smoke test)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per case, after one warm-up step")
    parser.add_argument("--out", type=Path, default=RESULTS / "teacher_cache_cpu.md")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        return peak_memory(args.model, args.scratch, args.memory_case, steps=2)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        built = {case: parts(args.model, scratch, case) for case in CASES}
        tokenizer, data = built["live fp32"][0], built["live fp32"][1]
        batches = [batch for batch, _ in zip(data.train_dataloader(), range(args.repeats + 1))]
        initial = built["live fp32"][2]
        runs = {case: module_and_optimizer(copy.deepcopy(initial), teacher, len(tokenizer)) for case, (_, _, _, teacher, _) in built.items()}
        # KD loss of each source on the first batch, before any step, against the float32 teacher's
        with torch.no_grad():
            losses = {case: float(module.training_step(batches[0], 0)["kd_loss"]) for case, (module, _) in runs.items()}
        seconds = {case: [] for case in CASES}
        for index, batch in enumerate(batches):
            for case, (module, optimizer) in runs.items():
                elapsed = step(module, optimizer, batch)
                if index:  # the first step warms up
                    seconds[case].append(elapsed)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches[1:]) / args.repeats
        memory = {
            case: json.loads(subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--memory-case", case, "--scratch", str(scratch)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1])["peak_mib"]
            for case in CASES
        }
        cache_files = {
            dtype: sum(path.stat().st_size for path in (scratch / f"cache-{dtype}" / "shards").iterdir())
            for dtype in ("float32", "bfloat16")
        }
        examples = [*data.train_set, *data.val_set]
        counted = sum(int(counted_positions(torch.tensor([example["labels"]])).sum()) for example in examples)
        build = built["cache fp32"][4]
    median = {case: statistics.median(values) for case, values in seconds.items()}
    # every case steps on the same batch in turn: the per-batch ratio cancels the batches' lengths
    ratios = {case: [mine / live for mine, live in zip(seconds[case], seconds["live fp32"])] for case in CASES}
    saving = median["live fp32"] - median["cache fp32"]
    build_per_example = build / (len(data.train_set) + len(data.val_set))
    steps_per_epoch = len(data.train_set) / data.batch_size
    lines = [
        "# Teacher cache: step time, memory and break-even",
        "",
        f"`python benchmarks/teacher_cache.py --model {args.model} --repeats {args.repeats}` on "
        f"{cpu_description()}, torch {torch.__version__}: "
        "the default recipe's teacher and student, FKL at τ = 1, AdamW steps on batches of 4 Dolly examples "
        f"({tokens:.0f} tokens a batch on average), the four cases interleaved step by step; "
        f"median (min–max) of {args.repeats} steps after one warm-up step (the batches differ in length; the ratio "
        "to the live float32 teacher is taken batch by batch). Peak memory: max RSS of a process "
        "of its own during 2 steps (after building the models).",
        "",
        "| teacher | s / step | × live fp32, per batch | peak RSS (MiB) | KD loss, first batch | vs live fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        lines.append(
            f"| {case} | {median[case]:.2f} ({min(seconds[case]):.2f}–{max(seconds[case]):.2f}) "
            f"| {statistics.median(ratios[case]):.2f} ({min(ratios[case]):.2f}–{max(ratios[case]):.2f}) "
            f"| {memory[case]:.0f} | {losses[case]:.5f} "
            f"| {losses[case] / losses['live fp32'] - 1:+.2e} |"
        )
    lines += [
        "",
        f"Cache build (the teacher's forward over {len(data.train_set) + len(data.val_set)} examples, batch 4, float32): "
        f"{build:.1f} s, {build_per_example:.2f} s per example. Size per counted token: "
        f"{cache_files['float32'] / counted / 1024:.2f} KiB in float32, {cache_files['bfloat16'] / counted / 1024:.2f} KiB "
        "in bfloat16 (the hidden size × 4 or 2 bytes).",
        "",
        f"Break-even: a run that sees every example once saves {saving:.2f} s per step of 4 examples "
        f"({saving / data.batch_size:.2f} s per example), against {build_per_example:.2f} s per example to build: "
        f"the cache pays for itself after {build_per_example / max(saving / data.batch_size, 1e-9):.2f} runs "
        f"({steps_per_epoch:.0f}-step epochs here); every further run of a sweep saves that much again.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
