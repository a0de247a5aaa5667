#!/usr/bin/env bash
# Set up (first time only) and run the tiny pipeline end to end on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowmem-rlhf run recipes/tiny/pipeline.yaml "$@"
