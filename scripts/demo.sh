#!/usr/bin/env bash
# Set up (first time only), run the tiny pipeline on CPU: SFT -> RM -> PPO and SFT -> DPO, then compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowmem-rlhf run recipes/tiny/pipeline.yaml
# greedy samples of the untrained base and of each policy, gold-scored
.venv/bin/python -m lowmem_rlhf.tiny.evaluate runs/tiny --stages sft ppo dpo --show 2
echo
echo "Run folder: runs/tiny (config.yaml, manifest.json; sft/, reward/, ppo/, dpo/ with adapters and metrics.jsonl)"
echo "PPO vs DPO report: runs/tiny/compare/report.md"
echo "  plots: runs/tiny/compare/reward_vs_kl.png, runs/tiny/compare/training.png, runs/tiny/compare/lengths.png"
