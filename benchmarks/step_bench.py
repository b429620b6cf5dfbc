"""Time and peak memory of one distillation training step on the SmolLM2 setup, against
the fine-tuning floor and the peers a user would otherwise reach for.

Setup for every case: the SmolLM2-135M-Instruct teacher (offline GGUF, ``model=smollm2``)
and its layer-copy student, one batch of the same 4 Dolly examples (each long enough to
fill ``--max-length`` tokens, so the batch is 4 × max_length), AdamW at the recipe's
learning rate, gradient clipping at the recipe's norm, τ = 1, forward KL, float32 unless
the case says otherwise, the same thread count.

Cases are interleaved: ``--steps`` rounds, each running every case once in a fresh
process (``--warmup`` untimed steps, then one timed step: forward, backward and optimizer
step), the order rotated from round to round. The table gives the median with min–max
over the rounds, the ratio of the medians to the floor's, and each case's peak memory
during its timed step (the process's resident high-water mark, reset through
``/proc/self/clear_refs`` as the step starts, so it counts the models, optimizer state
and the step's own memory, not loading or compiling; the allocator's peak on CUDA).

    python benchmarks/step_bench.py                      # → benchmarks/results/step_bench_cpu.md
    python benchmarks/step_bench.py --device cuda        # → benchmarks/results/step_bench_gpu.md
    python benchmarks/step_bench.py --steps 2 --warmup 1 --max-length 64 --out /tmp/smoke.md   # a smoke run

Cases (``--cases`` picks some; the floor always runs):
  floor               the student's plain fine-tuning step (Hugging Face cross-entropy on the
                      labels) plus the teacher's forward pass under no_grad
  kd-default          ``kd-train`` as shipped (fused loss head), through the Lightning Trainer
  kd-compile          ``module.compile_loss=true``
  kd-bf16-teacher     ``model.teacher.dtype=bfloat16``
  kd-bf16-mixed       ``trainer.precision=bf16-mixed`` (autocast, float32 master weights)
  kd-bf16-loss        ``module.loss_matmul_dtype=bfloat16`` (the fused loss head's matmuls in bf16)
  kd-latf-1, kd-latf-0.5, kd-latf-0.25
                      ``selection=latf`` with its kept ratio pinned (δ = 0)
  kd-teacher-cache    ``teacher_cache=DIR`` after ``kd-cache`` (the cache's build is not timed)
  trl-gkd             TRL's GKDTrainer, offline (lmbda = 0) forward KL (beta = 0), its
                      bf16 and gradient-checkpointing defaults off like every other case
  trl-distillation    the chunked loss of TRL's DistillationTrainer (beta = 0) in a plain
                      loop: that trainer always generates on-policy, so its own step is not
                      comparable; its loss head is
  torch-kl-div        a hand-written loop: full logits of both models, ``F.kl_div``
  liger-jsd           the same loop with Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta = 0)

Peers come from the ``bench`` extra (``pip install -e ".[bench]"``); a missing one is a
row saying so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from kd_lightning.data.datamodule import counted_positions

sys.path.insert(0, str(Path(__file__).parent))
from loss_bench import device_name, in_fresh_process, interleaved_rounds, memory_bytes, reset_peak, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KD_CASES = {
    "kd-default": [],
    "kd-compile": ["module.compile_loss=true"],
    "kd-bf16-teacher": ["model.teacher.dtype=bfloat16"],
    "kd-bf16-mixed": ["trainer.precision=bf16-mixed"],
    "kd-bf16-loss": ["module.loss_matmul_dtype=bfloat16"],
    "kd-latf-1": ["selection=latf"],
    "kd-latf-0.5": ["selection=latf"],
    "kd-latf-0.25": ["selection=latf"],
    "kd-teacher-cache": [],
}
PEER_CASES = ["trl-gkd", "trl-distillation", "torch-kl-div", "liger-jsd"]
LIGER_GPU_ANCHOR = (
    "Liger-Kernel's published H100 anchor for its fused linear JSD loss head (V = 128k, 8,192 tokens): "
    "60.7 ms / 11.1 GB against 213 ms / 68.9 GB for torch"
)


# ------------------------------------------------------------------ measuring
class Meter:
    """Wall time of each step (synchronised on CUDA) and the peak memory of the timed step,
    the first after ``warmup`` steps (models, optimizer state and data already in memory;
    loading and compiling not in the window)."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.seconds = device, warmup, []
        self.loss_tokens: int | None = None  # tokens in the loss, where the step reports them

    def start(self) -> None:
        self.synchronize()
        if len(self.seconds) == self.warmup:
            reset_peak(self.device)
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.synchronize()
        self.seconds.append(time.perf_counter() - self.started)

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_gib(self) -> float:
        return memory_bytes(self.device, peak=True) / 2**30


METER: Meter | None = None


class LightningMeter(L.Callback):
    """Feeds ``METER`` from the Lightning Trainer: batch start to batch end is forward,
    backward and optimizer step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        METER.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        METER.stop()
        METER.loss_tokens = int(outputs["kept_tokens"])


def pinned_latf(ratio: float, **latf_options):
    """LATF keeping the ``ratio`` hardest tokens at every step: δ = 0 never moves the ratio."""
    from kd_lightning.callbacks import LossAdaptiveTokenFocusing

    policy = LossAdaptiveTokenFocusing(**{**latf_options, "delta": 0.0})
    policy.ratio = ratio
    return policy


# ------------------------------------------------------------------ the setup
def select_examples(max_length: int, count: int = 5) -> list[dict]:
    """The first ``count`` Dolly training records with a short prompt and a response of at
    least 5 characters per token of ``max_length`` (so that each fills ``max_length``):
    one for the (unused) validation split the data module requires, four for the batch."""
    from kd_lightning.data.datamodule import load_json_lines, resolve_data_path

    chosen = []
    for record in load_json_lines(resolve_data_path("dolly")):
        # the prompt template takes ~40 tokens: keep prompts at about half of max_length
        prompt_chars = len(record["instruction"]) + len(record["input"] or "")
        if prompt_chars <= max(40, 2 * max_length - 150) and len(record["output"]) >= 5 * max_length:
            chosen.append({key: record[key] for key in ("instruction", "input", "output")})
        if len(chosen) == count:
            return chosen
    raise ValueError(f"fewer than {count} Dolly records fill {max_length} tokens; lower --max-length")


def base_overrides(args, data_file: Path, run_dir: Path) -> list[str]:
    """``kd-train`` overrides every case shares: the model, the one batch, no validation,
    no checkpoints, no logger."""
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return [
        "model=smollm2", f"data.path={data_file}", "data.val_size=1", "data.shuffle=false",
        f"data.max_length={args.max_length}", "data.batch_size=4", "data.max_train_examples=null",
        f"trainer.accelerator={accelerator}", f"trainer.max_steps={args.warmup + 1}",
        "trainer.limit_val_batches=0", f"trainer.val_check_interval={args.warmup + 1}",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint", "logger=none", "temperature=1.0", "divergence=fkl",
        f"hydra.run.dir={run_dir}",
    ]


def compose(overrides: list[str], run_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module("kd_lightning.conf", version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def kd_case(case: str, args, data_file: Path, run_dir: Path) -> None:
    """One ``kd-train`` run of ``--warmup`` + 1 steps, timed by ``LightningMeter``."""
    from omegaconf import open_dict

    from kd_lightning.train import fit

    overrides = base_overrides(args, data_file, run_dir) + KD_CASES[case]
    if case == "kd-teacher-cache":
        cache_dir = run_dir / "teacher_cache"
        subprocess.run([sys.executable, "-m", "kd_lightning.cache_build", *overrides, f"teacher_cache={cache_dir}"], check=True)
        overrides.append(f"teacher_cache={cache_dir}")
    cfg = compose(overrides, run_dir)
    with open_dict(cfg):
        cfg.callbacks.step_meter = {"_target_": f"{__name__}.LightningMeter"}
        if case.startswith("kd-latf-"):
            cfg.callbacks.latf = {
                **cfg.callbacks.latf, "_target_": f"{__name__}.pinned_latf", "ratio": float(case.rsplit("-", 1)[1]),
            }
    fit(cfg)


def models_and_batch(args, data_file: Path, run_dir: Path):
    """Teacher, student, tokenizer and the one batch, built as ``kd-train`` builds them."""
    from hydra.utils import instantiate

    cfg = compose(base_overrides(args, data_file, run_dir), run_dir)
    L.seed_everything(cfg.seed)
    tokenizer = instantiate(cfg.model.tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup()
    batch = {key: value.to(args.device) for key, value in next(iter(datamodule.train_dataloader())).items()}
    teacher = instantiate(cfg.model.teacher)().to(args.device).requires_grad_(False).eval()
    student = instantiate(cfg.model.student)(teacher=teacher).to(args.device).train()
    return cfg, tokenizer, teacher, student, batch


def peer_loss(case: str, teacher, student, batch: dict):
    """The loss function of a hand-written loop: ``loss(batch) → scalar``."""
    import torch.nn.functional as F

    from kd_lightning.models import last_hidden_state

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    counted = counted_positions(batch["labels"])
    if case == "floor":

        def loss():
            with torch.no_grad():
                teacher(**inputs)
            return student(**inputs, labels=batch["labels"]).loss

        return loss
    if case == "torch-kl-div":

        def loss():
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits[:, :-1][counted]
            student_logits = student(**inputs).logits[:, :-1][counted]
            return F.kl_div(
                F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True, reduction="batchmean"
            )

        return loss

    def hidden_states():
        with torch.no_grad():
            teacher_hidden = last_hidden_state(teacher, inputs)[:, :-1]
        return last_hidden_state(student, inputs)[:, :-1], teacher_hidden

    heads = (student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    if case == "liger-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
        labels = batch["labels"][:, 1:][counted]

        def loss():
            student_hidden, teacher_hidden = hidden_states()
            return jsd(student_hidden[counted], heads[0], teacher_hidden[counted], heads[1], labels)

        return loss
    if case == "trl-distillation":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def loss():
            student_hidden, teacher_hidden = hidden_states()
            return _chunked_divergence_loss(student_hidden, teacher_hidden, *heads, counted.long(), beta=0.0)[0]

        return loss
    raise ValueError(f"unknown case {case!r}")


def loop_case(case: str, args, data_file: Path, run_dir: Path) -> None:
    """A hand-written training loop of ``--warmup`` + 1 steps."""
    from hydra.utils import instantiate

    cfg, _, teacher, student, batch = models_and_batch(args, data_file, run_dir)
    loss = peer_loss(case, teacher, student, batch)
    optimizer = instantiate(cfg.module.optimizer)(student.parameters())
    for _ in range(args.warmup + 1):
        METER.start()
        loss().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        METER.stop()


def trl_gkd_case(args, data_file: Path, run_dir: Path) -> None:
    """TRL's GKDTrainer on the same batch: offline (lmbda = 0), forward KL (beta = 0)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg, tokenizer, teacher, student, batch = models_and_batch(args, data_file, run_dir)
    # the GGUF weights were dequantised to float32 at load; the Trainer would refuse the
    # student for the leftover quantizer object alone
    student.hf_quantizer, student.is_quantized = None, False

    class HuggingFaceMeter(TrainerCallback):
        def on_step_begin(self, *_, **__):
            METER.start()

        def on_step_end(self, *_, **__):
            METER.stop()

    config = GKDConfig(
        output_dir=str(run_dir / "trl"), lmbda=0.0, beta=0.0, temperature=1.0, per_device_train_batch_size=4,
        max_steps=args.warmup + 1, learning_rate=cfg.module.optimizer.lr, weight_decay=cfg.module.optimizer.weight_decay,
        max_grad_norm=cfg.trainer.gradient_clip_val, lr_scheduler_type="cosine", report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=cfg.seed,
        bf16=False, gradient_checkpointing=False,  # TRL defaults both on: keep every case float32, no recompute
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"example": i} for i in range(4 * (args.warmup + 1))]),
        data_collator=lambda features: {key: value.clone() for key, value in batch.items()},
        callbacks=[HuggingFaceMeter()],
    )
    trainer.train()


def measure(case: str, args) -> dict:
    """Run ``case`` in this process; its timed step's seconds and the peak memory of its steps."""
    global METER
    METER = Meter(args.device, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        data_file = run_dir / "examples.jsonl"
        data_file.write_text("".join(json.dumps(record) + "\n" for record in select_examples(args.max_length)))
        try:
            if case in KD_CASES:
                kd_case(case, args, data_file, run_dir)
            elif case == "trl-gkd":
                trl_gkd_case(args, data_file, run_dir)
            else:
                loop_case(case, args, data_file, run_dir)
        except ImportError as error:
            message = str(error) if str(error).startswith("skipped") else f"not installed ({str(error).strip()[:100]})"
            return {"case": case, "error": message}
    if len(METER.seconds) != args.warmup + 1:
        return {"case": case, "error": f"ran {len(METER.seconds)} steps instead of {args.warmup + 1}"}
    result = {"case": case, "seconds": METER.seconds[-1], "peak_gib": METER.peak_gib()}
    return result if METER.loss_tokens is None else {**result, "loss_tokens": METER.loss_tokens}


def batch_shape_and_counted_tokens(args) -> tuple[str, int]:
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "examples.jsonl"
        data_file.write_text("".join(json.dumps(record) + "\n" for record in select_examples(args.max_length)))
        cfg = compose(base_overrides(args, data_file, Path(tmp)), Path(tmp))
        datamodule = instantiate(cfg.data, tokenizer=instantiate(cfg.model.tokenizer))
        datamodule.setup()
        batch = next(iter(datamodule.train_dataloader()))
    shape = "×".join(str(size) for size in batch["input_ids"].shape)
    return shape, int(counted_positions(batch["labels"]).sum())


def table(summaries: list[dict], args, shape: str, counted: int) -> str:
    floor = next(result for result in summaries if result["case"] == "floor")
    if "error" in floor:
        raise RuntimeError(f"the floor failed: {floor['error']}")
    lines = [
        f"# Training step benchmark ({args.device})",
        "",
        f"SmolLM2-135M-Instruct teacher → layer-copy student (`model=smollm2`), batch {shape} tokens, {counted} counted (response) tokens, forward KL at τ = 1, "
        f"AdamW; {device_name(args, args.threads)}, torch {torch.__version__}. "
        f"{args.steps} interleaved rounds; in each, every case runs in a fresh process: {args.warmup} untimed "
        f"step{'s' if args.warmup != 1 else ''}, then one timed step (forward, backward, optimizer step).",
        "",
        "| case | median (s) | min–max (s) | median / floor | peak memory (GiB) | peak / floor's | tokens in the loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for result in summaries:
        if "error" in result:
            notes.append(f"- {result['case']}: {result['error']}")
            continue
        lines.append(
            f"| {result['case']} | {result['median']:.3f} | {result['min']:.3f}–{result['max']:.3f} | "
            f"{result['median'] / floor['median']:.2f} | {result['peak_gib']:.2f} | {result['peak_gib'] / floor['peak_gib']:.2f} | "
            f"{result.get('loss_tokens', counted)} |"
        )
    lines += [
        "",
        "floor: the student's cross-entropy fine-tuning step plus the teacher's forward pass under no_grad. "
        "kd-*: `kd-train` through the Lightning Trainer with the override named in the script's docstring. "
        "Peak memory: the process's resident high-water mark during the timed step (CPU; models and optimizer "
        "state included, loading and compiling excluded) or the CUDA allocator's peak, the highest of the rounds.",
    ]
    if notes:
        lines += ["", "Not measured:", *notes]
    if args.device == "cuda":
        lines += ["", f"For reference (a loss head alone, not a step): {LIGER_GPU_ANCHOR}."]
    return "\n".join(lines) + "\n"


def run_case(case: str, args) -> dict:
    options = ["--device", args.device, "--warmup", str(args.warmup), "--max-length", str(args.max_length)]
    return in_fresh_process(__file__, case, options + (["--threads", str(args.threads)] if args.threads else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="interleaved rounds: timed steps per case (median, min, max)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed one, in each process")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (the batch is 4 × this)")
    parser.add_argument("--threads", type=int, help="torch threads in every case (default: torch's)")
    parser.add_argument("--cases", nargs="*", help="default: every case")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/step_bench_{cpu,gpu}.md")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args)), flush=True)
        return
    cases = args.cases or ["floor", *KD_CASES, *PEER_CASES]
    unknown = set(cases) - {"floor", *KD_CASES, *PEER_CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; valid: floor, {', '.join([*KD_CASES, *PEER_CASES])}")
    cases = ["floor", *[case for case in cases if case != "floor"]]
    rounds = interleaved_rounds(cases, args.steps, lambda case: run_case(case, args))
    out = args.out or RESULTS / f"step_bench_{'gpu' if args.device == 'cuda' else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table([summary(case, rounds[case]) for case in cases], args, *batch_shape_and_counted_tokens(args)))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
