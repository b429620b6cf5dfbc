#!/usr/bin/env bash
# Installs kd_lightning and everything it needs, CPU-only, into the current Python.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.13.0   # the CPU build; CUDA users install their torch first
python -m pip install --quiet -e ".[dev]"
