"""What a top-k teacher cache costs in accuracy, and what it saves in bytes and step time.

On real batches of a recipe (the default: SmolLM2-135M-Instruct → its 10-layer copy on
Dolly, batches of 4 examples ≤ 256 tokens; or a larger-vocabulary teacher given as a GGUF
file, with a student of its own layers), for K ∈ {8, 32, 128, 512, 2048}:

- bytes per counted token of the top-k cache (``K·2 + ⌈K·bits/8⌉ + 4``) against the
  exact cache's hidden states (``H·4`` in float32);
- per divergence (FKL, RKL, JSD, CSD) and τ (1 and 2): the relative error of the batch
  loss (mean over tokens of τ²·D) against the exact cache's, and the cosine between the
  gradients (student hidden states and lm_head weight together), each the median over
  the batches, with its range; the targets go through the cache's own storage
  (float16 log-probabilities, packed ids);
- the optimizer step (forward, backward, AdamW) from the exact cache, from the top-k
  cache and with the live teacher: medians of steps interleaved case by case over the
  same batches in one process, so that load on the machine hits every case alike.

    python benchmarks/topk_cache.py                                   # → benchmarks/results/topk_cache_cpu.md
    python benchmarks/topk_cache.py --teacher-gguf DIR/qwen.gguf --name qwen2.5-coder-0.5b --append
    python benchmarks/topk_cache.py --model tiny --batches 2 --repeats 1 --out /tmp/smoke.md   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import open_dict

from kd_lightning import DistillationModule, losses
from kd_lightning.cache import CachedTeacher, TeacherCacheWriter
from kd_lightning.heads import counted_states
from kd_lightning.models import lm_head
from kd_lightning.precision import cpu_description
from kd_lightning.topk_cache import TopKCachedTeacher, TopKCacheWriter, id_bits, pack_ids, top_log_probs, unpack_ids

RESULTS = Path(__file__).parent / "results"
TOP_KS = (8, 32, 128, 512, 2048)


def top_ks(vocab_size: int) -> list[int]:
    return [k for k in TOP_KS if k <= vocab_size]
DIVERGENCES = ("fkl", "rkl", "jsd", "csd")
TEMPERATURES = (1.0, 2.0)
FINGERPRINT = {"teacher": "benchmark", "teacher_files": {}, "tokenizer": "", "data": "", "max_length": 0, "template": ""}


def recipe(model: str, teacher_gguf: Path | None):
    """Tokenizer, data, live teacher and a student built from it."""
    overrides = [f"model={model}", "data.max_train_examples=200", "data.val_size=4"]
    if teacher_gguf is not None:  # a GGUF teacher of another family, its student from its own layers
        overrides = ["model=hf", f"model.teacher_path={teacher_gguf.parent}", "model.student_layers={every: 3}",
                     "model.teacher_tokenizer=null", "model.student_tokenizer=null",
                     "data.max_train_examples=200", "data.val_size=4", "data.batch_size=4", "data.max_length=256"]
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if teacher_gguf is not None:
        with open_dict(cfg):
            for part in (cfg.model.teacher, cfg.model.tokenizer):
                part.gguf_file = teacher_gguf.name
    tokenizer = instantiate(cfg.model.tokenizer)
    data = instantiate(cfg.data, tokenizer=tokenizer)
    data.setup()
    teacher = instantiate(cfg.model.teacher)().eval().requires_grad_(False)
    return tokenizer, data, teacher, instantiate(cfg.model.student)(teacher=teacher)


def stored(targets: losses.TopKTargets) -> losses.TopKTargets:
    """``targets`` as a cache returns them: float16 log-probabilities, ids packed and unpacked."""
    bits, top_k = id_bits(targets.vocab_size), targets.ids.shape[-1]
    ids = unpack_ids(pack_ids(targets.ids, bits), top_k, bits)
    return losses.TopKTargets(targets.log_probs.half().float(), ids, targets.tail_log_mass, targets.vocab_size)


def loss_and_gradient(divergence, student_hidden, student_weight, targets, temperature):
    """The batch loss (mean of τ²·D) and its gradient, flattened, for hidden states and weight."""
    hidden, weight = student_hidden.detach().requires_grad_(True), student_weight.detach().requires_grad_(True)
    loss = temperature**2 * losses.fused_divergence(divergence, hidden, weight, targets, temperature, 256).mean()
    gradients = torch.autograd.grad(loss, (hidden, weight))
    return float(loss.detach()), torch.cat([gradient.flatten() for gradient in gradients])


def cosine(first: torch.Tensor, second: torch.Tensor, chunk: int = 1 << 22) -> float:
    """The cosine of two flat vectors, summed in float64 chunk by chunk (a float64 copy of a
    gradient with the lm_head of a 152k vocabulary would take a GB)."""
    dot = first_norm = second_norm = 0.0
    for a, b in zip(first.split(chunk), second.split(chunk)):
        a, b = a.double(), b.double()
        dot, first_norm, second_norm = dot + float(a @ b), first_norm + float(a @ a), second_norm + float(b @ b)
    return dot / math.sqrt(first_norm * second_norm)


def accuracy(student, teacher, batches, vocab_size: int) -> dict:
    """(divergence, τ, K) → the per-batch relative loss errors and gradient cosines."""
    student_weight = lm_head(student).weight[:vocab_size]
    teacher_weight = lm_head(teacher).weight[:vocab_size]
    found = {}
    for batch in batches:
        with torch.no_grad():
            states = counted_states(student, teacher, batch)
        exact = losses.LinearTargets(states.teacher, teacher_weight)
        top = {k: stored(losses.TopKTargets(*top_log_probs(states.teacher @ teacher_weight.T, k), vocab_size)) for k in top_ks(vocab_size)}
        for name in DIVERGENCES:
            divergence = losses.get(name)
            for tau in TEMPERATURES:
                reference, reference_gradient = loss_and_gradient(divergence, states.student, student_weight, exact, tau)
                for k, targets in top.items():
                    value, gradient = loss_and_gradient(divergence, states.student, student_weight, targets, tau)
                    found.setdefault((name, tau, k), []).append((abs(value - reference) / reference, cosine(gradient, reference_gradient)))
    return found


def build_caches(scratch: Path, teacher, data, vocab_size: int, top_k: int) -> dict:
    """An exact and a top-k cache of the data (written by the caches' own writers)."""
    splits = {"train": data.train_set, "validation": data.val_set}
    exact = TeacherCacheWriter(scratch / "exact", {**FINGERPRINT, "dtype": "float32"})
    exact.write(teacher, splits, data.collate, 4, torch.device("cpu"))
    topk = TopKCacheWriter(scratch / "topk", {**FINGERPRINT, "dtype": "float16", "format": "topk", "top_k": top_k}, vocab_size)
    topk.write(teacher, splits, data.collate, 4, torch.device("cpu"))
    return {"exact cache": CachedTeacher(scratch / "exact"), f"top-{top_k} cache": TopKCachedTeacher(scratch / "topk")}


def step_seconds(student, sources: dict, batches, vocab_size: int) -> dict:
    """Seconds per optimizer step of each teacher source, interleaved over the same batches
    (the first round warms up and is not counted)."""
    runs = {}
    for case, source in sources.items():
        module = DistillationModule(student=copy.deepcopy(student), teacher=source, divergence="fkl", vocab_size=vocab_size)
        module.student.train()
        runs[case] = (module, torch.optim.AdamW(module.student.parameters(), lr=2e-4))
    seconds = {case: [] for case in sources}
    for index, batch in enumerate(batches):
        for case, (module, optimizer) in runs.items():
            started = time.perf_counter()
            module.training_step(batch, 0)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index:
                seconds[case].append(time.perf_counter() - started)
    return seconds


def spread(values: list[float], digits: str) -> str:
    return f"{statistics.median(values):{digits}} [{min(values):{digits}}, {max(values):{digits}}]"


def report(name: str, vocab_size: int, hidden_size: int, tokens: int, found: dict, seconds: dict, command: str) -> str:
    bits = id_bits(vocab_size)
    lines = [f"## {name}: V = {vocab_size:,} ({bits}-bit ids), H = {hidden_size}", "",
             f"`{command}` on {cpu_description()}; {tokens:,} counted tokens in the accuracy batches.", "",
             "| K | top-k bytes / token | exact (float32 states) | ratio |", "|---:|---:|---:|---:|"]
    for k in top_ks(vocab_size):
        topk_bytes = 2 * k + -(-k * bits // 8) + 4
        lines.append(f"| {k} | {topk_bytes:,} | {4 * hidden_size:,} | {topk_bytes / (4 * hidden_size):.3f} |")
    lines += ["", "Relative error of the batch loss (τ²·D, mean over tokens) against the exact cache, median "
              "[min, max] over the batches, and the gradient's cosine (median):", "",
              "| divergence | τ | " + " | ".join(f"K = {k}" for k in top_ks(vocab_size)) + " |",
              "|---|---:|" + "---:|" * len(top_ks(vocab_size))]
    for divergence in DIVERGENCES:
        for tau in TEMPERATURES:
            cells = []
            for k in top_ks(vocab_size):
                errors, cosines = zip(*found[(divergence, tau, k)])
                cells.append(f"{spread([100 * e for e in errors], '.2f')} %, cos {statistics.median(cosines):.4f}")
            lines.append(f"| {divergence} | {tau:g} | " + " | ".join(cells) + " |")
    if seconds:
        lines += ["", f"Optimizer step (FKL, τ = 1) under a load average of {os.getloadavg()[0]:.1f}: seconds, median [min, "
                  "max] of interleaved steps, and the ratio to the exact cache's step on the same batch (median [min, max]):",
                  "", "| teacher source | seconds | vs exact cache |", "|---|---:|---:|"]
        for case, values in seconds.items():
            ratios = [value / exact for value, exact in zip(values, seconds["exact cache"])]
            lines.append(f"| {case} | {spread(values, '.3f')} | {spread(ratios, '.2f')} |")
    return "\n".join(lines) + "\n"


HEADER = """# Top-k teacher cache: bytes, accuracy and step time (CPU)

Written by `benchmarks/topk_cache.py`. Noisy shared machines: every figure is a ratio or a
median measured within one run. The top-k targets go through the cache's storage (float16
log-probabilities, packed ids); at τ ≠ 1 the tail is re-tempered as if spread evenly over
its ids (`losses.TopKTargets`).

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model config: smollm2 (the default recipe) or tiny (smoke test)")
    parser.add_argument("--teacher-gguf", type=Path, help="a GGUF teacher of another family (its student: every third layer)")
    parser.add_argument("--name", default="SmolLM2-135M-Instruct (the default recipe)")
    parser.add_argument("--batches", type=int, default=8, help="batches for the accuracy table")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per case, after one warm-up step (0: no timing)")
    parser.add_argument("--timed-k", type=int, default=32, help="K of the top-k cache whose step is timed")
    parser.add_argument("--out", type=Path, default=RESULTS / "topk_cache_cpu.md")
    parser.add_argument("--append", action="store_true", help="add this teacher's section to --out")
    args = parser.parse_args()
    tokenizer, data, teacher, student = recipe(args.model, args.teacher_gguf)
    vocab_size = len(tokenizer)
    loader = data.train_dataloader()
    batches = [batch for batch, _ in zip(loader, range(max(args.batches, args.repeats + 1)))]
    found = accuracy(student, teacher, batches[: args.batches], vocab_size)
    tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches[: args.batches])
    seconds = {}
    if args.repeats:
        with tempfile.TemporaryDirectory() as scratch:
            timed = {int(record) for batch in batches[: args.repeats + 1] for record in batch["record"]}
            data.train_set = data.train_set.select([i for i, r in enumerate(data.train_set["record"]) if r in timed])
            sources = {"live teacher": teacher, **build_caches(Path(scratch), teacher, data, vocab_size, args.timed_k)}
            seconds = step_seconds(student, sources, batches[: args.repeats + 1], vocab_size)
    command = "python benchmarks/topk_cache.py " + " ".join(f"{a}" for a in __import__("sys").argv[1:])
    section = report(args.name, vocab_size, lm_head(teacher).weight.shape[1], tokens, found, seconds, command.strip())
    text = (args.out.read_text() if args.append and args.out.exists() else HEADER) + "\n" + section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
