"""Time and peak memory of the distillation loss head, every divergence, eager vs fused, and peers.

Every measurement runs in a fresh process (the peak resident memory of a process only
grows) on the same inputs: student hidden states ``[T, Hs]`` and lm_head ``[V, Hs]``
(trainable), teacher hidden states ``[T, Ht]`` and lm_head ``[V, Ht]``. A case computes
the per-token loss, its mean, and the backward pass into the student's hidden states and
lm_head. The cases are interleaved: ``--repeats`` rounds, each running every case once
(``--warmup`` untimed calls, then one timed call), in an order rotated from round to
round, so that a slow spell of the machine spreads over all cases instead of landing on
one. The table gives the median over the rounds with the min–max, as ratios to the
floor — the student and teacher logit matmuls and the two gradient matmuls of the
student's, nothing else — measured in the same rounds:

    python benchmarks/loss_bench.py                    # CPU: T=1024, Hs=896, Ht=1536, V=151,936
    python benchmarks/loss_bench.py --device cuda      # writes loss_bench_gpu.md
    python benchmarks/loss_bench.py --tokens 64 --vocab 4096 --repeats 2 --out /tmp/smoke.md   # a smoke run

Peers, when installed: Liger-Kernel's fused linear JSD (``LigerFusedLinearJSDLoss``, soft
loss only), TRL's GKD ``generalized_jsd_loss`` (on materialised logits), torchtune's
chunked forward KL (``ForwardKLWithChunkedOutputLoss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def inputs(args):
    generator = torch.Generator(device=args.device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, device=args.device, dtype=getattr(torch, args.dtype)) * scale

    student_hidden = randn(args.tokens, args.student_hidden).requires_grad_(True)
    student_weight = randn(args.vocab, args.student_hidden, scale=args.student_hidden**-0.5).requires_grad_(True)
    teacher_hidden = randn(args.tokens, args.teacher_hidden)
    teacher_weight = randn(args.vocab, args.teacher_hidden, scale=args.teacher_hidden**-0.5)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def case_function(case: str, args):
    """A callable running one forward + backward of ``case`` on the inputs."""
    from kd_lightning import losses

    kind, _, name = case.partition(":")
    if kind == "floor":

        def run(student_hidden, student_weight, teacher_hidden, teacher_weight):
            with torch.no_grad():
                student_logits = student_hidden @ student_weight.T
                teacher_logits = teacher_hidden @ teacher_weight.T  # noqa: F841 (what a loss reads)
                student_hidden.grad = student_logits @ student_weight
                student_weight.grad = student_logits.T @ student_hidden

        return run
    if kind in ("eager", "fused", "compiled", "fused-bf16", "compiled-bf16"):
        divergence = losses.get(name)

        def run(student_hidden, student_weight, teacher_hidden, teacher_weight):
            if kind == "eager":
                per_token = divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, args.temperature)
            else:
                per_token = losses.fused_linear_divergence(
                    divergence, student_hidden, student_weight, teacher_hidden, teacher_weight,
                    args.temperature, args.chunk_size, compile=kind.startswith("compiled"),
                    matmul_dtype=torch.bfloat16 if kind.endswith("-bf16") else None,
                )
            per_token.mean().backward()

        return run
    if kind == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=args.temperature)
        labels = torch.zeros(args.tokens, dtype=torch.long, device=args.device)

        def run(student_hidden, student_weight, teacher_hidden, teacher_weight):
            loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels).backward()

        return run
    if kind == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        def run(student_hidden, student_weight, teacher_hidden, teacher_weight):
            student_logits = (student_hidden @ student_weight.T).unsqueeze(0)
            teacher_logits = (teacher_hidden @ teacher_weight.T).unsqueeze(0)
            GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=args.temperature).backward()

        return run
    if kind == "torchtune":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
        labels = torch.zeros(1, args.tokens, dtype=torch.long, device=args.device)

        def run(student_hidden, student_weight, teacher_hidden, teacher_weight):
            chunks = zip(student_hidden.chunk(8), teacher_hidden.chunk(8))
            student_chunks, teacher_chunks = zip(*((s @ student_weight.T, t @ teacher_weight.T) for s, t in chunks))
            student_chunks = [chunk.unsqueeze(0) for chunk in student_chunks]
            teacher_chunks = [chunk.unsqueeze(0) for chunk in teacher_chunks]
            loss(student_chunks, teacher_chunks, labels).backward()

        return run
    raise ValueError(f"unknown case {case!r}")


def reset_peak(device: str) -> None:
    """Start a new peak-memory window: the CUDA allocator's peak, or the process's resident
    high-water mark (Linux ≥ 4.0, through /proc/self/clear_refs; elsewhere the peak keeps
    counting from the start of the process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_bytes(device: str, peak: bool) -> int:
    """Memory in use now, or its peak since ``reset_peak``: the CUDA allocator's, or the
    process's resident set (VmRSS / VmHWM; ru_maxrss where /proc is missing)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    status = Path("/proc/self/status")
    if status.exists():
        field = "VmHWM:" if peak else "VmRSS:"
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(case: str, args) -> dict:
    """Run ``case`` in this process: seconds of the timed call, and its peak memory above
    what was in use just before it (the inputs, and what the warm-up calls left, such as
    torch.compile's compiled code: the loss's working memory alone)."""
    tensors = inputs(args)
    try:
        run = case_function(case, args)
    except ImportError as error:
        return {"case": case, "error": f"not installed ({error.__class__.__name__}: {str(error).strip()[:80]})"}
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for warm in range(args.warmup):
        run(*tensors)
        tensors[0].grad = tensors[1].grad = None
    synchronize()
    baseline = memory_bytes(args.device, peak=False)
    reset_peak(args.device)
    start = time.perf_counter()
    run(*tensors)
    synchronize()
    seconds = time.perf_counter() - start
    return {"case": case, "seconds": seconds, "peak_gib": (memory_bytes(args.device, peak=True) - baseline) / 2**30}


def summary(case: str, rounds: list[dict]) -> dict:
    """One case over the rounds: median, min and max seconds, the highest peak, other
    fields of the last round as they are; the first error when a round failed."""
    errors = [result["error"] for result in rounds if "error" in result]
    if errors:
        return {"case": case, "error": errors[0]}
    seconds = sorted(result["seconds"] for result in rounds)
    return {
        **{key: value for key, value in rounds[-1].items() if key not in ("seconds", "peak_gib")},
        "case": case, "median": statistics.median(seconds), "min": seconds[0], "max": seconds[-1],
        "rounds": len(seconds), "peak_gib": max(result["peak_gib"] for result in rounds),
    }


# Liger-Kernel's published H100 figures for its fused linear JSD against plain torch
# (V = 128k, 8,192 tokens): a reference point for GPU tables, not measured here
LIGER_GPU_ANCHOR = "Liger-Kernel's published H100 anchor (V = 128k, 8,192 tokens): fused linear JSD 60.7 ms / 11.1 GB against 213 ms / 68.9 GB for torch"


def table(summaries: list[dict], args) -> str:
    by_case = {result["case"]: result for result in summaries}
    floor, naive = by_case["floor"], by_case.get("eager:fkl")
    naive_extra = naive["peak_gib"] - floor["peak_gib"] if naive and "median" in naive else None
    lines = [
        f"# Loss head benchmark ({args.device})",
        "",
        f"T = {args.tokens} tokens, student hidden {args.student_hidden}, teacher hidden {args.teacher_hidden}, "
        f"V = {args.vocab:,}, {args.dtype}, τ = {args.temperature}, fused chunk size {args.chunk_size}; "
        f"{device_name(args)}, torch {torch.__version__}. "
        f"{args.repeats} interleaved rounds; in each, every case runs in a fresh process: {args.warmup} untimed "
        f"call{'s' if args.warmup != 1 else ''}, then one timed forward + backward.",
        "",
        f"Floor (the four matmuls alone): median {floor['median']:.3f} s (min–max {floor['min']:.3f}–{floor['max']:.3f}), "
        f"peak {floor['peak_gib']:.2f} GiB above the memory in use before the call.",
        "",
        "| case | median (s) | min–max (s) | median / floor | peak above floor (GiB) | extra peak / naive FKL's |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in summaries:
        if result["case"] == "floor":
            continue
        if "error" in result:
            lines.append(f"| {result['case']} | {result['error']} | | | | |")
            continue
        extra = result["peak_gib"] - floor["peak_gib"]
        versus_naive = f"{extra / naive_extra:.2f}" if naive_extra else ""
        lines.append(
            f"| {result['case']} | {result['median']:.3f} | {result['min']:.3f}–{result['max']:.3f} | "
            f"{result['median'] / floor['median']:.2f} | {extra:+.2f} | {versus_naive} |"
        )
    lines += [
        "",
        "eager: materialised logits, autograd through the divergence; fused: "
        "`losses.fused_linear_divergence`; compiled: the same with `compile=True` (each process compiles in its "
        "warm-up call); -bf16: with `matmul_dtype=torch.bfloat16` (the four matmuls in bf16). Peak memory is the timed call's resident high-water mark "
        "(CPU) or allocator's peak (GPU) above the memory in use just before it (inputs, compiled code), the highest of the rounds, "
        "minus the floor's.",
    ]
    if args.device == "cuda":
        lines += ["", f"For reference: {LIGER_GPU_ANCHOR}."]
    return "\n".join(lines) + "\n"


def device_name(args, threads: int | None = None) -> str:
    """The GPU's name, or the CPU's model, the ``threads`` its cases ran on (default: torch's)
    and whether it has native bf16."""
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    from kd_lightning.precision import cpu_description

    return cpu_description(threads)


def in_fresh_process(script: str, case: str, options: list[str]) -> dict:
    """One measurement of ``case``: ``script --measure CASE OPTIONS`` in a fresh process,
    which prints its result as a JSON line; a failure becomes a row saying why."""
    done = subprocess.run([sys.executable, script, "--measure", case, *options], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]  # the exception's message
    return {"case": case, "error": f"failed: {last_line[:300]}"}


def run_case(case: str, args) -> dict:
    options = [
        item for key, value in vars(args).items()
        if key not in ("measure", "cases", "out", "repeats") and value is not None
        for item in (f"--{key.replace('_', '-')}", str(value))
    ]
    return in_fresh_process(__file__, case, options)


def interleaved_rounds(cases: list[str], repeats: int, measure_once) -> dict[str, list[dict]]:
    """``repeats`` rounds of ``measure_once(case)`` over every case, the order rotated by
    one each round (round r starts at case r); a case that fails is not run again."""
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for round_index in range(repeats):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if any("error" in result for result in results[case]):
                continue
            result = measure_once(case)
            results[case].append(result)
            print(json.dumps({"round": round_index + 1, **result}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--student-hidden", type=int, default=896)
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed one, in each process (compiled cases and Liger get at least 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds: timed calls per case (the table gives their median)")
    parser.add_argument("--cases", nargs="*", help="default: floor, every divergence eager/fused/compiled, the peers")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/loss_bench_{cpu,gpu}.md")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.measure:
        if args.measure.startswith(("compiled", "liger:")):  # torch.compile: the warm-up call compiles
            args.warmup = max(args.warmup, 1)
        print(json.dumps(measure(args.measure, args)))
        return

    from kd_lightning import losses

    cases = args.cases or [
        "floor",
        *[f"{kind}:{name}" for name in losses.available() for kind in ("eager", "fused", "compiled")],
        *[f"{kind}:{name}" for name in ("fkl", "rkl", "jsd", "csd") for kind in ("fused-bf16", "compiled-bf16")],
        "liger:jsd",
        "trl:jsd",
        "torchtune:fkl",
    ]
    if "floor" not in cases:
        cases = ["floor", *cases]
    rounds = interleaved_rounds(cases, args.repeats, lambda case: run_case(case, args))
    out = args.out or RESULTS / f"loss_bench_{'gpu' if args.device == 'cuda' else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table([summary(case, rounds[case]) for case in cases], args))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
