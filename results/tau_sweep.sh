#!/usr/bin/env bash
# Reproduces results/tau_sweep.csv: every run of experiment=tau_sweep, then ROUGE-L of its
# student (greedy, the first 20 instructions of each test set, 64 new tokens), plus the
# teacher, the student before distillation and a student trained with cross-entropy only.
# Runs that already have their rouge.csv are skipped, so the script resumes where it stopped.
#   bash results/tau_sweep.sh [RUNS_DIR]      (default: runs/tau_sweep)
set -euo pipefail
runs=${1:-runs/tau_sweep}
eval_args=(--greedy --num-examples 20 --max-new-tokens 64)

run() {  # run NAME ROLE [kd-train overrides...]
  local name=$1 role=$2 dir=$runs/$1
  shift 2
  [[ -f $dir/rouge.csv ]] && return
  [[ -f $dir/checkpoints/last.ckpt ]] || kd-train experiment=tau_sweep "$@" hydra.run.dir="$dir"
  kd-eval "$dir" --role "$role" "${eval_args[@]}"
}

for divergence in fkl rkl; do
  for tau in 0.5 1 2 4; do run "$divergence-tau$tau" student divergence=$divergence temperature=$tau; done
done
run teacher teacher trainer.max_steps=0
run student-init student-init trainer.max_steps=0
run ce student module.ce_weight=1.0
for tau in 0.5 1 2 4; do run "csd-tau$tau" student divergence=csd temperature=$tau; done
for tau in 0.5 1 2 4; do run "rkl-adakd-tau$tau" student divergence=rkl selection=adakd temperature=$tau; done
for tau in 0.5 1 2 4; do run "jsd-tau$tau" student divergence=jsd temperature=$tau; done

python - "$runs" results/tau_sweep.csv <<'PY'
import csv, sys
from pathlib import Path
rows = [row for path in sorted(Path(sys.argv[1]).glob("*/rouge.csv")) for row in csv.DictReader(path.open())]
with open(sys.argv[2], "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"{len(rows)} rows -> {sys.argv[2]}")
PY
