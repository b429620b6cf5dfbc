#!/usr/bin/env bash
# Both benchmarks on one CUDA GPU, with the peers of the `bench` extra:
#   benchmarks/results/loss_bench_gpu.md  — the loss head at Liger-Kernel's published shape
#                                           (8,192 tokens, V = 128,256, teacher hidden 4,096,
#                                           student 2,048, bf16), the anchor quoted under the table
#   benchmarks/results/step_bench_gpu.md  — one distillation step on the SmolLM2 setup
# Usage (from anywhere, in an environment with a CUDA torch and `pip install -e ".[dev,bench]"`):
#   bash benchmarks/gpu.sh                 # both, 5 interleaved rounds each
#   REPEATS=3 bash benchmarks/gpu.sh       # fewer rounds
#   LOSS_CASES="floor fused:fkl liger:jsd" STEP_CASES="floor kd-default trl-gkd" bash benchmarks/gpu.sh
# The default loss-head cases are the divergences the goals name (FKL, RKL, JSD, CSD) and the
# peers; every step case runs (see `python benchmarks/step_bench.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
REPEATS="${REPEATS:-5}"
LOSS_CASES="${LOSS_CASES:-floor eager:fkl fused:fkl compiled:fkl fused:rkl compiled:rkl fused:jsd compiled:jsd fused:csd compiled:csd liger:jsd trl:jsd}"
STEP_CASES="${STEP_CASES:-}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
python benchmarks/loss_bench.py --device cuda --repeats "$REPEATS" --tokens 8192 --vocab 128256 \
    --student-hidden 2048 --teacher-hidden 4096 --dtype bfloat16 --chunk-size 1024 --cases $LOSS_CASES
python benchmarks/step_bench.py --device cuda --steps "$REPEATS" --warmup 2 ${STEP_CASES:+--cases $STEP_CASES}
