"""``kd-export``: the distilled student as a Hugging Face model directory with a model card.

    kd-export outputs/DATE/TIME OUT_DIR                          # the run's last checkpoint
    kd-export outputs/DATE/TIME/checkpoints/step40.ckpt OUT_DIR  # any checkpoint, FSDP ones too
    kd-export --adapters-only outputs/DATE/TIME OUT_DIR          # a LoRA student's adapters (merged without it)

``OUT_DIR`` then holds config.json, model.safetensors, generation_config.json, the
tokenizer (with its chat template) and README.md, and loads anywhere with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)``. ``export.enabled=true`` writes the
same directory at the end of training (``export.dir``, default ``RUN/student``).
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedTokenizerBase

from kd_lightning.cli import reported_errors
from kd_lightning.constants import PLAIN_TEMPLATE
from kd_lightning.runs import describe_run, load_run, run_directory
from kd_lightning.safe_checkpoints import TRUST_CHECKPOINT_HELP


def run_settings(cfg: DictConfig) -> dict[str, str]:
    """The settings of a run that a model card names."""
    teacher = cfg.model.teacher
    source = teacher.get("gguf_file") or teacher.get("name_or_path") or teacher.get("_target_")
    run = describe_run(cfg)
    params = ", ".join(f"{key}={value}" for key, value in run["divergence_params"].items())
    settings = {
        "teacher": str(source),
        "divergence": run["divergence"] + (f" ({params})" if params else ""),
        "temperature τ": f"{run['temperature']} ({run['temperature_schedule']})",
        "token selection": run["selection"],
        "data source policy": run["policy"],
        "cross-entropy weight": str(run["ce_weight"]),
        "training data": f"{cfg.data.path} (max_length {cfg.data.max_length}, max_train_examples {cfg.data.max_train_examples})",
        "steps": f"{cfg.trainer.max_steps} × batch {cfg.data.batch_size} per process",
        "learning rate": f"{cfg.module.optimizer.lr} ({cfg.module.lr_scheduler})",
        "seed": str(run["seed"]),
    }
    lora = cfg.module.get("lora")
    if lora is not None and lora.r > 0:
        settings["LoRA adapters"] = f"r {lora.r}, alpha {lora.alpha}, on {lora.target_modules} (merged unless exported with --adapters-only)"
    return settings


def final_metrics(run_dir: Path) -> dict[str, str]:
    """The last value of each validation and evaluation metric in ``RUN/metrics.csv``,
    and the ROUGE-L rows of ``RUN/rouge.csv`` (kd-eval), by test set and decoding."""
    metrics: dict[str, str] = {}
    if (run_dir / "metrics.csv").is_file():
        for row in csv.DictReader((run_dir / "metrics.csv").open()):
            metrics.update({k: f"{float(v):.4g}" for k, v in row.items() if v and k.startswith(("val/", "eval/"))})
    if (run_dir / "rouge.csv").is_file():
        for row in csv.DictReader((run_dir / "rouge.csv").open()):
            if row["divergence"] not in ("teacher", "student-init"):
                metrics[f"ROUGE-L {row['dataset']} ({row['decoding']})"] = row["rouge_l"]
    return metrics


def model_card(settings: dict[str, str], metrics: dict[str, str], chat_template: bool) -> str:
    prompt = (
        "The tokenizer's chat template: the instruction is the user turn."
        if chat_template
        else "No chat template: prompts follow the plain instruction template\n\n```\n" + PLAIN_TEMPLATE + "```"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [knowledge-distillation, kd_lightning]",
        "---",
        "",
        "# Distilled student",
        "",
        "Trained with kd_lightning: a frozen teacher distilled into this model.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in settings.items()],
        "",
        "## Final metrics",
        "",
        *(["| metric | value |", "|---|---|", *[f"| {name} | {value} |" for name, value in metrics.items()]] if metrics else ["None recorded."]),
        "",
        "## Prompt format",
        "",
        prompt,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
        "```",
        "",
    ]
    return "\n".join(lines)


def save_student(
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    card: str,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``student`` (or ``state_dict`` into its config), the tokenizer and the card."""
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card)
    return out_dir


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a LoRA student (a peft wrapper with adapters)."""
    return hasattr(model, "peft_config")


def export(path: Path, out_dir: Path, adapters_only: bool = False, trust_checkpoint: bool = False) -> Path:
    """The student of a run directory or checkpoint as a Hugging Face model directory; a
    LoRA student with its adapters merged into its weights, or (``adapters_only``) as a
    peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``). The
    checkpoint is read restricted to weights and plain values unless ``trust_checkpoint``."""
    tokenizer, student, cfg = load_run(path, "student", trust_checkpoint=trust_checkpoint)
    if adapters_only and not is_lora(student):
        raise ValueError(f"{path} trained the whole student, not LoRA adapters (model.lora.r was 0): export it without --adapters-only")
    if is_lora(student) and not adapters_only:
        student = student.merge_and_unload()
    card = model_card(run_settings(cfg), final_metrics(run_directory(path)), bool(tokenizer.chat_template))
    return save_student(student, tokenizer, out_dir, card)


class ExportStudent(L.Callback):
    """At the end of training, write the student to ``out_dir`` as ``kd-export`` does
    (gathered from its shards under FSDP; written by the first process), with a model
    card describing ``run_config``."""

    def __init__(self, out_dir: str | Path, run_config: DictConfig):
        self.out_dir, self.settings = Path(out_dir), run_settings(run_config)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if pl_module.lora and isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(
                "export.enabled does not merge a LoRA student sharded by FSDP: train with export.enabled=false "
                "and run kd-export on the run's checkpoint"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        if is_lora(student):  # the merged model, as kd-export writes it; the live student keeps its adapters
            student = copy.deepcopy(student).merge_and_unload()
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            tokenizer = trainer.datamodule.tokenizer
            metrics = {k: f"{float(v):.4g}" for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "eval/"))}
            card = model_card(self.settings, metrics, bool(tokenizer.chat_template))
            save_student(student, tokenizer, self.out_dir, card, state_dict=full)
            print(f"student exported to {self.out_dir}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a kd-train run directory, or a checkpoint inside one")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--adapters-only", action="store_true", help="a LoRA student's adapter directory (peft), not the merged model"
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_CHECKPOINT_HELP)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported_errors("kd-export", args.debug):
        exported = export(args.checkpoint, args.out_dir, args.adapters_only, args.trust_checkpoint)
        print(f"student exported to {exported}")


if __name__ == "__main__":
    main()
