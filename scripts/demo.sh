#!/usr/bin/env bash
# Set up (first time only), run the tiny pipeline (SFT -> RM -> PPO) on CPU, then gold-score its samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowmem-rlhf run recipes/tiny/pipeline.yaml
.venv/bin/python -m lowmem_rlhf.tiny.evaluate runs/tiny --show 3
echo "Run folder: runs/tiny (config.yaml, manifest.json; sft/, reward/ and ppo/ with adapters, metrics.jsonl, ppo/eval.json)"
