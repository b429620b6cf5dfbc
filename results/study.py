"""The distillation study: every arm × seed of experiment=study, trained from one teacher
cache and evaluated the same way, rows appended to results/study.csv as runs finish.

    python results/study.py                 # all that is missing, core arms first
    python results/study.py --only pilot    # the learning-rate pilot (CE-only, seed 0)
    python results/study.py --only cross --cross-teacher-gguf DIR/teacher.gguf   # a teacher of another family
    python results/study.py --only core --runs /tmp/s --cache /tmp/c --rows /tmp/r --table /tmp/s.csv \
        --prompts 2 --overrides model=tiny '~model.student.layers' trainer.max_steps=2   # a smoke run

Several drivers may share one ``--runs`` directory (one per free core): each run is held
by the driver that trains it (an advisory lock that the OS drops when that process ends),
so the others go on to the next one. Resumable across machines: each evaluated run leaves
its rows in ``--rows`` (committed with the project, ``results/study_runs/NAME.csv``, and
the run's training log as ``results/study_runs/logs/NAME.csv``) and is skipped from then
on; a run with a checkpoint in ``--runs`` continues from it (ckpt_path=last); the teacher
caches in ``--cache`` are built once per machine (kd-cache resumes a partial build).
Every model (the teacher and the untrained student included) is evaluated under bf16
autocast, as the students train (bf16-mixed); on a CPU without native bf16, both run their
bf16 matmuls as float32 matmuls of the bf16 operands (``kd_lightning.precision``). Metrics per run:
- ``nll`` and ``teacher_kl``: per-token NLL of the references and forward KL(teacher ‖
  student) at τ = 1, over every Dolly test example that fits 512 tokens;
- ``rouge_l`` (sampling, top-p 1, temperature 1, one seed), ``rouge_l_greedy`` and
  ``gen_tokens`` (mean answer length of the sampled answers) on the first 100 prompts of
  Dolly test and Self-Instruct and all 80 of Vicuna;
- ``train_seconds`` (dataset ``all``): training's wall time, validation included, with the
  other drivers beside it, summed over a resumed run's parts; the CPU of each part is in
  ``results/study_runs/logs/NAME.machines.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kd_lightning import DistillationModule, InstructionDataModule
from kd_lightning.cache import CachedTeacher
from kd_lightning.evaluation import eval_records, generate, rouge_l
from kd_lightning.data.datamodule import format_prompt
from kd_lightning.precision import cpu_bf16_matmuls, cpu_description
from kd_lightning.runs import load_run, run_config

SEEDS = (0, 1, 2)
#: K of the top-k arm: the smallest K of benchmarks/results/topk_cache_cpu.md whose FKL loss error is under 1%
TOP_K = 2048
#: the pilot: CE-only at another learning rate than the config's 2e-4 (whose run is ce-seed0)
PILOT = {"pilot-ce-lr5e-4": ["module.ce_weight=1", "module.optimizer.lr=5.0e-4"]}
#: TRL 1.16 GKDTrainer's loss: generalized JSD, β = 0.5, no τ² factor, at τ = 1 (its compute_loss
#: leaves generalized_jsd_loss's temperature at 1; GKDConfig.temperature, 0.9, is the sampling's only)
GKD_LOSS = ["divergence=jsd", "divergence.beta=0.5", "temperature=1", "module.scale_by_tau_sq=false"]
#: name → (group, kd-train overrides); the core arms run first, for every seed
ARMS = {
    "ce": ("core", ["module.ce_weight=1"]),
    "fkl-tau1": ("core", ["divergence=fkl", "temperature=1"]),
    "rkl-tau1": ("core", ["divergence=rkl", "temperature=1"]),
    "fkl-tau2": ("core", ["divergence=fkl", "temperature=2"]),
    "rkl-tau2": ("core", ["divergence=rkl", "temperature=2"]),
    "fkl-tau4": ("temperature", ["divergence=fkl", "temperature=4"]),
    "rkl-tau4": ("temperature", ["divergence=rkl", "temperature=4"]),
    "csd-ts-tau1": ("csd", ["divergence=csd", "divergence.weighting=ts", "temperature=1"]),
    "rkl-adakd-tau1": ("adakd", ["divergence=rkl", "selection=adakd", "temperature=1"]),
    f"fkl-top{TOP_K}-tau1": ("topk", ["divergence=fkl", "temperature=1"]),
    # a teacher of another family (--cross-teacher-gguf): hybrid with FKL at the core arms' best τ
    # for sampled ROUGE-L (2), uld and gold at their authors' τ = 1; uld with its authors' cross-entropy
    # at 1:1 (ULD alone is blind to which token is which: any permutation of the student's vocabulary
    # leaves it unchanged), gold without, as TRL's GOLDConfig (uld_crossentropy_weight = 0)
    "hybrid-fkl-tau2": ("cross", ["cross_tokenizer=hybrid", "divergence=fkl", "temperature=2"]),
    "uld-ce-tau1": ("cross", ["cross_tokenizer=uld", "temperature=1", "module.ce_weight=0.5"]),
    "gold-tau1": ("cross", ["cross_tokenizer=gold", "temperature=1"]),
    # on the student's own samples, from the live teacher: GKD as TRL GKDTrainer runs at its defaults
    # (λ = 0.5, JSD β = 0.5 at τ = 1 with no τ² factor, sampling at temperature 0.9, top-p 1, 128 new
    # tokens), DistiLLM (skew KL α = 0.1, adaptive off-policy: conf/policy/mixed.yaml), GKD's loss offline
    "gkd": ("onpolicy", ["policy=on_policy", "policy.lambda=0.5", *GKD_LOSS,
                         "callbacks.student_responses.sampling_temperature=0.9", "callbacks.student_responses.top_p=1.0",
                         "callbacks.student_responses.max_new_tokens=128"]),
    "distillm": ("onpolicy", ["policy=mixed", "divergence=skl", "divergence.alpha=0.1", "temperature=1"]),
    "jsd-tau1": ("onpolicy", GKD_LOSS),
}
GROUPS = ("core", "temperature", "csd", "adakd", "topk", "cross", "onpolicy")
#: the arms whose teacher scores the student's samples: no cache can serve them
LIVE_TEACHER = ("policy=on_policy", "policy=mixed")
#: group → the teacher cache its arms train from (a directory of --cache) and how kd-cache builds it
#: (the cross group's cache holds the teacher's own tokens, which serve all three objectives)
CACHES = {"topk": (f"train-top{TOP_K}", ["cache.format=topk", f"cache.top_k={TOP_K}"]),
          "cross": ("train-cross", ["cross_tokenizer=hybrid"])}
DEFAULT_CACHE = ("train", [])
DEFAULT_TEACHER = "SmolLM2-135M-Instruct"
#: a run's record of the machines its training ran on, one line per start or resume
MACHINES = "machines.txt"
#: minutes of training between two saves of last.ckpt: what a stopped run loses at most
CHECKPOINT_MINUTES = 10


def arm_cache(arm: str) -> tuple[str, list[str]] | None:
    """The teacher cache ``arm`` trains from: its directory in --cache and its kd-cache
    overrides; None for an arm that needs the live teacher."""
    if arm in ARMS and any(override in LIVE_TEACHER for override in ARMS[arm][1]):
        return None
    return CACHES.get(ARMS[arm][0], DEFAULT_CACHE) if arm in ARMS else DEFAULT_CACHE
EVAL_PROMPTS = 100
EVAL_SETS = ("dolly-test", "self-inst", "vicuna")
COLUMNS = ("divergence", "temperature", "selection", "policy", "teacher", "teacher_outputs", "seed", "examples", "metric",
           "dataset", "value")


def group_models(group: str, args) -> list[str]:
    """The model overrides of a group's kd-cache and kd-train: for the cross group, the
    teacher in ``--cross-teacher-gguf`` with its own tokenizer and the study's student,
    exported once to ``--cache/student`` (``export_student``); none for the others."""
    if group != "cross":
        return []
    if args.cross_teacher_gguf is None:
        raise SystemExit("the cross group needs its teacher: --cross-teacher-gguf FILE (results/candidate_teachers.py)")
    gguf = args.cross_teacher_gguf.resolve()
    return ["model=hf", f"model.teacher_path={gguf.parent}", f"model.teacher_gguf_file={gguf.name}",
            f"model.student_path={export_student(args.cache / 'student', args.overrides)}", "model.student.layers=null"]


def export_student(directory: Path, extra: list[str]) -> Path:
    """The study's untrained student (its default teacher's first 12 and last 3 layers) and
    its tokenizer, saved once to ``directory``: the same initialisation for a teacher of another family."""
    if not (directory / "config.json").exists():
        from hydra import compose, initialize_config_module
        from hydra.utils import instantiate

        from kd_lightning.models import build_student

        with initialize_config_module("kd_lightning.conf", version_base="1.3"):
            cfg = compose("train", overrides=["experiment=study", *extra])
        student = build_student(instantiate(cfg.model.student), instantiate(cfg.model.teacher))
        partial = directory.with_name(directory.name + ".partial")
        student.save_pretrained(partial)
        instantiate(cfg.model.tokenizer).save_pretrained(partial)
        os.replace(partial, directory)
    return directory


def sh(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def build_caches(args, groups: list[str]) -> None:
    """The caches the ``groups`` train from (the exact one of the training data, a top-k
    one, the cross-family teacher's), and the default teacher's states for Dolly test (at
    512 tokens), which every run is evaluated on."""
    cache, extra = args.cache, args.overrides
    if any(group not in CACHES for group in groups):
        sh("kd-cache", "experiment=study", *extra, f"teacher_cache={cache / 'train'}", f"hydra.run.dir={cache / 'train-log'}")
    for group in (group for group in groups if group in CACHES):
        name, overrides = CACHES[group]
        sh("kd-cache", "experiment=study", *group_models(group, args), *overrides, *extra, f"teacher_cache={cache / name}",
           f"hydra.run.dir={cache / f'{name}-log'}")
    sh(
        "kd-cache", "experiment=study", *extra, "data.path=dolly-test", "data.val_size=0", "data.max_train_examples=null",
        "data.max_length=512", f"teacher_cache={cache / 'dolly-test'}", f"hydra.run.dir={cache / 'dolly-test-log'}",
    )


def train(run_dir: Path, overrides: list[str], cache: Path | None) -> None:
    """``kd-train`` of one run from ``cache`` (the live teacher for None), resumed where it
    stopped; each part's start and machine are appended to ``run_dir/machines.txt``."""
    if (run_dir / "checkpoints" / "done").exists():
        return
    resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []
    source = [] if cache is None else [f"teacher_cache={cache}"]
    record_machine(run_dir, resumed=bool(resume))
    sh("kd-train", "experiment=study", *source, *overrides, *resume, f"checkpoint.every_minutes={CHECKPOINT_MINUTES}",
       f"hydra.run.dir={run_dir}")
    (run_dir / "checkpoints" / "done").touch()


def record_machine(run_dir: Path, resumed: bool) -> None:
    """Append a line to ``run_dir/machines.txt``: when this part of the run's training starts, and on which CPU."""
    with open(run_dir / MACHINES, "a") as record:
        record.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {'resumed' if resumed else 'started'} on {cpu_description()}\n")


@contextlib.contextmanager
def claim(run_dir: Path):
    """True while this driver holds ``run_dir``, False when another driver does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".claim", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True


def examples_seen(run_dir: Path) -> int:
    """Training examples a run sees: its steps × its batch size."""
    cfg = run_config(run_dir)
    return cfg.trainer.max_steps * cfg.data.batch_size


@torch.no_grad()
def held_out_losses(model, tokenizer, test_cache: Path) -> dict[str, float]:
    """Token-mean NLL of the references and FKL(teacher ‖ model) at τ = 1 on Dolly test."""
    data = InstructionDataModule(tokenizer, path="dolly-test", max_length=512, val_size=0, batch_size=8)
    data.setup()
    module = DistillationModule(student=model, teacher=CachedTeacher(test_cache), divergence="fkl", vocab_size=len(tokenizer))
    totals = {"nll": 0.0, "teacher_kl": 0.0, "tokens": 0}
    for batch in data.loader(data.train_set, shuffle=False):
        out = module.distillation_losses(batch, apply_policies=False)
        tokens = int(out["kept_tokens"])
        totals["nll"] += float(out["ce_loss"]) * tokens
        totals["teacher_kl"] += float(out["kd_loss"]) * tokens
        totals["tokens"] += tokens
    return {metric: totals[metric] / totals["tokens"] for metric in ("nll", "teacher_kl")}


def generation_metrics(
    model, tokenizer, num_prompts: int, datasets: tuple[str, ...] = EVAL_SETS, greedy: bool = True
) -> list[tuple[str, str, float]]:
    """Sampled (and ``greedy``) ROUGE-L, and the sampled answers' mean length, on the first
    ``num_prompts`` prompts of each test set."""
    rows = []
    for dataset in datasets:
        records = eval_records(dataset, num_prompts)
        prompts = [format_prompt(tokenizer, record["instruction"], record.get("input") or "") for record in records]
        for metric, sampling in (("rouge_l", True), ("rouge_l_greedy", False))[: 2 if greedy else 1]:
            torch.manual_seed(1)
            answers = generate(model, tokenizer, prompts, batch_size=16, do_sample=sampling)  # top-p 1, temperature 1
            rows.append((metric, dataset, sum(rouge_l(a, r["output"]) for a, r in zip(answers, records)) / len(records)))
            if sampling:
                lengths = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
                rows.append(("gen_tokens", dataset, sum(lengths) / len(lengths)))
    return rows


def evaluate(run_dir: Path, role: str, description: dict, test_cache: Path, out: Path, prompts: int) -> None:
    """Evaluate the ``role`` model of ``run_dir`` into ``out`` (skipped when it exists), with
    the run's training time where its checkpoint recorded it."""
    if out.exists():
        return
    seconds = training_seconds(run_dir)
    tokenizer, model, _ = load_run(run_dir, role)
    rows = evaluate_model(model, tokenizer, test_cache, prompts) + ([] if seconds is None else [("train_seconds", "all", seconds)])
    for record, kept in (("metrics.csv", out.name), (MACHINES, f"{out.stem}.{MACHINES}")):  # the training curves, the machines
        if (run_dir / record).exists():
            (out.parent / "logs").mkdir(exist_ok=True)
            shutil.copyfile(run_dir / record, out.parent / "logs" / kept)
    write_rows(rows, description, out)
    print(f"{run_dir.name}: " + ", ".join(f"{m}/{d}={v:.2f}" for m, d, v in rows), flush=True)


def training_seconds(run_dir: Path) -> float | None:
    """Training's wall time of a run (Lightning's Timer in its last checkpoint, the earlier
    parts of a resumed run included); None without one (a baseline, or a run trained before kd-train timed)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    states = torch.load(last, map_location="cpu", mmap=True, weights_only=True)["callbacks"]
    return next((state["time_elapsed"]["train"] for key, state in states.items() if key.startswith("Timer")), None)


def evaluate_model(model, tokenizer, test_cache: Path, prompts: int) -> list[tuple[str, str, float]]:
    """(metric, dataset, value) of a model under bf16 autocast: the held-out losses and the generation metrics."""
    model.eval()
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16), cpu_bf16_matmuls(device_type):
        rows = [(metric, "dolly-test", value) for metric, value in held_out_losses(model, tokenizer, test_cache).items()]
        return rows + generation_metrics(model, tokenizer, prompts)


def write_rows(rows: list[tuple[str, str, float]], description: dict, out: Path) -> None:
    """The rows of one evaluated model, each with its ``description``, written atomically to ``out``."""
    with open(str(out) + ".partial", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for metric, dataset, value in rows:
            writer.writerow({**description, "metric": metric, "dataset": dataset, "value": f"{value:.4f}"})
    os.replace(str(out) + ".partial", out)


def evaluate_baselines(run_dir: Path, args) -> None:
    """The teacher and the untrained student, built from the config of ``run_dir``, once."""
    for role in ("teacher", "student-init"):
        baseline = args.runs / role
        if (args.rows / f"{role}.csv").exists():
            continue
        with claim(baseline) as mine:
            if mine:
                shutil.copytree(run_dir / ".hydra", baseline / ".hydra", dirs_exist_ok=True)
                evaluate(baseline, role, description(role, 0, 0), args.cache / "dolly-test", args.rows / f"{role}.csv", args.prompts)


def collect(rows_dir: Path, table: Path, pattern: str) -> None:
    rows = [row for path in sorted(rows_dir.glob(f"{pattern}.csv")) for row in csv.DictReader(path.open())]
    for row in rows:  # rows written before these columns existed: offline, the default teacher's exact cache
        row["teacher_outputs"] = row.get("teacher_outputs") or "exact"
        row["teacher"] = row.get("teacher") or DEFAULT_TEACHER
        row["policy"] = row.get("policy") or "offline"
    if not rows:  # e.g. no pilot run among these rows: no empty table
        return
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows -> {table}", flush=True)


def teacher_outputs(arm: str) -> str:
    """What ``arm`` trains from: ``live`` (the teacher scores the student's samples), ``exact`` or ``top-K``."""
    cache = arm_cache(arm)
    if cache is None:
        return "live"
    settings = dict(item.split("=", 1) for item in cache[1])
    return f"top-{settings['cache.top_k']}" if settings.get("cache.format") == "topk" else "exact"


def description(arm: str, seed: int, examples: int, teacher: str = DEFAULT_TEACHER) -> dict:
    """A row's description of ``arm``; ``divergence`` is the cross-tokenizer objective (with
    hybrid's divergence, ``hybrid-fkl``) for the cross group, ``+ce`` where a KD arm mixes in
    the cross-entropy (``uld+ce``)."""
    overrides = dict(item.split("=", 1) for item in ARMS[arm][1]) if arm in ARMS else {}
    divergence = "ce" if arm == "ce" or arm in PILOT else overrides.get("divergence", arm)
    if "cross_tokenizer" in overrides:
        divergence = "-".join(filter(None, (overrides["cross_tokenizer"], overrides.get("divergence"))))
    if divergence != "ce" and "module.ce_weight" in overrides:
        divergence += "+ce"
    return {
        "divergence": divergence,
        "temperature": overrides.get("temperature", ""),
        "selection": overrides.get("selection", "none"),
        "policy": overrides.get("policy", "offline"),
        "teacher": teacher,
        "teacher_outputs": teacher_outputs(arm),
        "seed": seed,
        "examples": examples,
    }


def plan(groups: list[str]) -> list[tuple[str, int, list[str]]]:
    """(arm, seed, overrides) in running order: the pilot, then each group for every seed."""
    runs = []
    if "pilot" in groups:
        runs += [("ce", 0, ARMS["ce"][1])] + [(name, 0, overrides) for name, overrides in PILOT.items()]
    for group in GROUPS:
        if group in groups:
            runs += [(arm, seed, overrides) for seed in SEEDS for arm, (arm_group, overrides) in ARMS.items() if arm_group == group]
    return list({(arm, seed): (arm, seed, overrides) for arm, seed, overrides in runs}.values())  # ce-seed0 once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/study"))
    parser.add_argument("--cache", type=Path, default=Path("runs/study-cache"))
    parser.add_argument("--rows", type=Path, default=Path("results/study_runs"), help="one CSV per evaluated run")
    parser.add_argument("--table", type=Path, default=Path("results/study.csv"))
    parser.add_argument("--only", choices=["pilot", *GROUPS], nargs="+")
    parser.add_argument("--prompts", type=int, default=EVAL_PROMPTS, help="generation prompts per test set")
    parser.add_argument("--overrides", nargs="*", default=[], help="for every kd-train and kd-cache (a smoke run: model=tiny …)")
    parser.add_argument("--cross-teacher-gguf", type=Path, help="the cross group's teacher, a GGUF file with its own tokenizer")
    parser.add_argument("--keep-checkpoints", action="store_true", help="default: delete a run's checkpoints once evaluated")
    args = parser.parse_args()
    groups = args.only or ["pilot", *(group for group in GROUPS if group != "cross" or args.cross_teacher_gguf)]
    build_caches(args, groups)
    args.rows.mkdir(parents=True, exist_ok=True)
    for arm, seed, overrides in plan(groups):
        name, run_dir = f"{arm}-seed{seed}", args.runs / f"{arm}-seed{seed}"
        rows = args.rows / f"{name}.csv"
        if not rows.exists():
            with claim(run_dir) as mine:
                if mine:
                    models = group_models(ARMS[arm][0] if arm in ARMS else "", args)
                    cache = arm_cache(arm)
                    train(run_dir, [*models, *overrides, f"seed={seed}", *args.overrides], cache and args.cache / cache[0])
                    teacher = args.cross_teacher_gguf.stem if models else DEFAULT_TEACHER
                    described = description(arm, seed, examples_seen(run_dir), teacher)
                    evaluate(run_dir, "student", described, args.cache / "dolly-test", rows, args.prompts)
                    if not args.keep_checkpoints:
                        for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
                            checkpoint.unlink()
        if not rows.exists():  # another driver's run
            continue
        evaluate_baselines(run_dir, args)
        collect(args.rows, args.table, "[!p]*")  # the study's runs and baselines, not the pilot's
        collect(args.rows, args.table.with_name("study_pilot.csv"), "pilot-*")


if __name__ == "__main__":
    sys.exit(main())
