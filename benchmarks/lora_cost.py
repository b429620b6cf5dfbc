"""Trainable parameters and step time of LoRA students against full fine-tuning on the
SmolLM2 setup.

Runs a few steps of the default recipe (SmolLM2-135M-Instruct teacher → 10-layer copy,
FKL, 4 Dolly examples ≤ 256 tokens a batch) training the whole student, then LoRA
adapters (``model.lora.*``), in this one process, in interleaved rounds (the order
rotated each round), and reports the trainable parameters and the median seconds per
step (each round's mean, the first step left out) with its min–max over the rounds:

    python benchmarks/lora_cost.py                   # → benchmarks/results/lora_cost_cpu.md
    python benchmarks/lora_cost.py --steps 2 --rounds 1 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from loss_bench import interleaved_rounds
from omegaconf import open_dict
from policy_cost import StepTimer

from kd_lightning.precision import cpu_description
from kd_lightning.train import fit

RESULTS = Path(__file__).parent / "results"
SETUPS = {
    "full fine-tuning": [],
    "LoRA r=16, q_proj + v_proj": ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=[q_proj,v_proj]"],
    "LoRA r=16, all linear layers": ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=all-linear"],
}


def run(overrides: list[str], steps: int, out_dir: Path) -> tuple[int, int, float]:
    """Trainable and total student parameters, and mean seconds per step after the first."""
    overrides = [
        *overrides, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={out_dir}",
    ]
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.callbacks.step_timer = {"_target_": "policy_cost.StepTimer"}
    HydraConfig.instance().set_config(cfg)
    trainer = fit(cfg)
    timer = next(callback for callback in trainer.callbacks if isinstance(callback, StepTimer))
    parameters = list(trainer.lightning_module.student.parameters())
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    return trainable, sum(parameter.numel() for parameter in parameters), sum(timer.seconds[1:]) / len(timer.seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_cost_cpu.md")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is left out of the mean")
    names = list(SETUPS)
    with tempfile.TemporaryDirectory() as scratch:

        def measure_once(name: str) -> dict:
            trainable, total, seconds = run(SETUPS[name], args.steps, Path(tempfile.mkdtemp(dir=scratch)))
            return {"case": name, "trainable": trainable, "total": total, "seconds": seconds}

        rounds = interleaved_rounds(names, args.rounds, measure_once)
    medians = {name: statistics.median(result["seconds"] for result in rounds[name]) for name in names}
    full = medians["full fine-tuning"]
    lines = [
        "# LoRA students against full fine-tuning",
        "",
        f"`python benchmarks/lora_cost.py --steps {args.steps} --rounds {args.rounds}` on "
        f"{cpu_description()}, torch {torch.__version__}: "
        "the default recipe (SmolLM2-135M-Instruct teacher → 10-layer copy, FKL, batches of 4 Dolly examples). "
        f"Seconds per step: the median over {args.rounds} interleaved rounds of each round's mean over steps "
        f"2–{args.steps}, with the rounds' min–max.",
        "",
        "| student | trainable parameters | % of the student | s / step [min–max] | × full |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        last, seconds = rounds[name][-1], [result["seconds"] for result in rounds[name]]
        lines.append(
            f"| {name} | {last['trainable']:,} | {100 * last['trainable'] / last['total']:.2f} | "
            f"{medians[name]:.2f} [{min(seconds):.2f}–{max(seconds):.2f}] | {medians[name] / full:.2f} |"
        )
    lines += [
        "",
        "The teacher's forward pass and the student's forward and backward through its frozen "
        "weights remain; LoRA saves the optimizer state and the weight gradients.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
