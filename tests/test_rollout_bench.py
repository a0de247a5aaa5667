"""Tests for benchmarks/rollout_bench.py: a CPU smoke run over cache variants and batch sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import rollout_bench  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "rollout.json"
    argv = ["--shape", "tiny", "--calls", "2", "--prompt-len", "8", "--new-tokens", "8", "--batch-sizes", "1", "3"]
    argv += ["--variants", "dynamic", "static", "base", "--temperature", "0", "--device", "cpu"]
    result = rollout_bench.main([*argv, "--cache-dir", str(tmp_path / "ckpt"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    runs = result["measurements"]["runs"]
    assert [(r["variant"], r["batch_size"]) for r in runs] == [
        (v, b) for v in ("dynamic", "static", "base") for b in (1, 3)
    ]
    by = {(r["variant"], r["batch_size"]): r for r in runs}
    for r in runs:  # two calls of each batch size: 2 or 6 rows, at least the prefill's token each
        assert 2 * r["batch_size"] <= r["generated_tokens"] <= 2 * r["batch_size"] * 8
        assert r["prefill_s"] > 0 and r["total_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["bandwidth_floor_tokens_per_s"] is None and r["peak_allocated_gib"] is None  # CPU
    # greedy: the cache and the rows per call never change the tokens, so the counts agree
    for b in (1, 3):
        assert by["dynamic", b]["generated_tokens"] == by["static", b]["generated_tokens"]
    # bytes per decode step: the KV cache of the rows of one call at mid-generation (8 + 4 tokens, fp32 on CPU)
    spec = SHAPES["tiny"]
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    kv_row = 2 * spec["num_hidden_layers"] * spec["num_key_value_heads"] * head_dim * 4 * 12
    for (variant, b), r in by.items():
        read = r["decode_bytes_per_step"]
        assert read["kv_cache"] == b * kv_row
        assert (read["lora"] > 0) == (variant != "base")
        assert read["total"] == read["base_weights"] + read["lora"] + read["kv_cache"]
    # the best run is a policy run (rollouts decode with the adapter); the target is unjudged on CPU
    assert result["measurements"]["best"]["variant"] in ("dynamic", "static")
    assert result["targets"]["decode"]["met"] is None and result["note"]
