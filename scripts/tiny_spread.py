"""How much the tiny pipeline's outcomes vary with the seed and the CPU kernel path.

Runs `recipes/tiny/pipeline.yaml` (SFT -> RM -> PPO, SFT -> DPO, compare), the greedy compare and GRPO
from the same SFT and RM, exactly as tests/test_pipeline.py does, once per (seed, kernel path), each in
its own process (the kernel path is fixed when torch starts), and records every number that test
asserts on. Kernel paths: `pinned` (the toolkit's default: torch's AVX2 kernels, MKL's AVX2 path) and
`native` (LOWMEM_RLHF_CPU_KERNELS=native: what torch picks for this CPU, e.g. AVX-512).

    python scripts/tiny_spread.py --seeds 42 1 2 3 4 5 --paths pinned native --jobs 2 \
        --out benchmarks/results/tiny_spread.json

The test's thresholds are set from the smallest value seen here minus a stated margin (docs/tiny.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(seed: int, out: Path) -> dict:
    """The pipeline at `seed` in `out`, and the numbers tests/test_pipeline.py checks."""
    import shutil

    from lowmem_rlhf.cli import main
    from lowmem_rlhf.config import ModelConfig
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.model.loading import load_base
    from lowmem_rlhf.rollout.generate import SamplingConfig
    from lowmem_rlhf.tiny.evaluate import gold_report, heldout_prompts
    from lowmem_rlhf.train.metrics import read_metrics

    recipe = str(REPO / "recipes" / "tiny" / "pipeline.yaml")
    start = time.time()
    assert main(["run", recipe, f"output_dir={out}", f"seed={seed}"]) == 0
    pipeline_s = time.time() - start
    diag = json.loads((out / "reward" / "diagnostics.json").read_text())
    model, tokenizer = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", from_dir=out / "sft")
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    base = gold_report(bank, None, tokenizer, heldout_prompts(48), greedy)
    tuned = gold_report(bank, "policy", tokenizer, heldout_prompts(48), greedy)
    assert main(["compare", str(out), "--temperature", "0", "--output", str(out / "greedy")]) == 0
    grpo = out.parent / f"{out.name}-grpo"
    shutil.copytree(out, grpo, ignore=shutil.ignore_patterns("ppo", "dpo", "compare", "greedy"))
    manifest = json.loads((grpo / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("sft", "rm")}
    (grpo / "manifest.json").write_text(json.dumps(manifest))
    assert main(["ppo", str(REPO / "recipes" / "tiny" / "grpo.yaml"), f"output_dir={grpo}", f"seed={seed}"]) == 0

    def rl(run: Path) -> dict:
        report = json.loads((run / "ppo" / "eval.json").read_text())
        rows = read_metrics(run / "ppo" / "metrics.jsonl")
        out = {"kl_first": rows[0]["kl"], "kl_last": rows[-1]["kl"]}
        for mode in ("greedy", "sampled"):
            for key in ("gold", "reward"):
                out[f"{mode}_{key}_gain"] = report["ppo"][mode][key] - report["sft"][mode][key]
        return out

    dpo = json.loads((out / "dpo" / "diagnostics.json").read_text())
    sampled = json.loads((out / "compare" / "report.json").read_text())["policies"]
    at_t0 = json.loads((out / "greedy" / "report.json").read_text())["policies"]
    label = out.name
    return {
        "seed": seed,
        "pipeline_s": round(pipeline_s, 1),
        "rm_eval_accuracy": diag["eval_accuracy"],
        "rm_eval_length_corr": diag["eval_length_corr"],
        "sft_greedy_gold": tuned.mean_gold,
        "base_greedy_gold": base.mean_gold,
        "sft_greedy_eos_rate": tuned.eos_rate,
        "dpo": {k: dpo[k] for k in ("eval_margin", "eval_loss", "eval_accuracy", "sample_kl")},
        "ppo": rl(out),
        "grpo": rl(grpo),
        "compare_sampled": {
            k.split("/")[-1]: {m: v.get(m) for m in ("gold", "reward", "win_rate_reward", "win_rate_gold", "kl")}
            for k, v in sampled.items()
        },
        "compare_greedy": {
            k.split("/")[-1]: {m: v.get(m) for m in ("gold", "reward", "win_rate_reward", "win_rate_gold")}
            for k, v in at_t0.items()
        },
        "label": label,
    }


def launch(seed: int, path: str, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if path == "native":
        env["LOWMEM_RLHF_CPU_KERNELS"] = "native"
    out = work / f"{path}-{seed}" / "tiny"
    code = f"import json, sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); from tiny_spread import one_run; "
    code += f"from pathlib import Path; print('RESULT ' + json.dumps(one_run({seed}, Path({str(out)!r}))))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"seed {seed} ({path}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    return {"path": path, **result}


# what tests/test_pipeline.py asserts on, as (name, value of one run)
QUANTITIES = {
    "rm held-out accuracy": lambda r: r["rm_eval_accuracy"],
    "rm reward-length correlation": lambda r: r["rm_eval_length_corr"],
    "sft greedy gold": lambda r: r["sft_greedy_gold"],
    "sft - base greedy gold": lambda r: r["sft_greedy_gold"] - r["base_greedy_gold"],
    "sft greedy EOS rate": lambda r: r["sft_greedy_eos_rate"],
    "ppo greedy reward gain": lambda r: r["ppo"]["greedy_reward_gain"],
    "ppo sampled reward gain": lambda r: r["ppo"]["sampled_reward_gain"],
    "ppo greedy gold gain": lambda r: r["ppo"]["greedy_gold_gain"],
    "ppo sampled gold gain": lambda r: r["ppo"]["sampled_gold_gain"],
    "ppo last KL": lambda r: r["ppo"]["kl_last"],
    "grpo greedy reward gain": lambda r: r["grpo"]["greedy_reward_gain"],
    "grpo sampled reward gain": lambda r: r["grpo"]["sampled_reward_gain"],
    "grpo greedy gold gain": lambda r: r["grpo"]["greedy_gold_gain"],
    "grpo sampled gold gain": lambda r: r["grpo"]["sampled_gold_gain"],
    "grpo last KL": lambda r: r["grpo"]["kl_last"],
    "compare: ppo win rate (RM)": lambda r: r["compare_sampled"]["ppo"]["win_rate_reward"],
    "compare: ppo - sft gold": lambda r: r["compare_sampled"]["ppo"]["gold"] - r["compare_sampled"]["sft"]["gold"],
    "compare: dpo - sft gold": lambda r: r["compare_sampled"]["dpo"]["gold"] - r["compare_sampled"]["sft"]["gold"],
    "greedy: dpo - sft gold": lambda r: r["compare_greedy"]["dpo"]["gold"] - r["compare_greedy"]["sft"]["gold"],
    "dpo held-out margin": lambda r: r["dpo"]["eval_margin"],
    "dpo held-out loss": lambda r: r["dpo"]["eval_loss"],
    "dpo held-out accuracy": lambda r: r["dpo"]["eval_accuracy"],
}


def report(results: list[dict]) -> str:
    """A markdown table: one row per quantity, one column per (kernel path, seed), then min, mean and std."""
    import statistics

    results = sorted(results, key=lambda r: (r["path"], r["seed"]))
    head = ["quantity", *(f"{r['path']} {r['seed']}" for r in results), "min", "mean", "std"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, value in QUANTITIES.items():
        vals = [value(r) for r in results]
        stats = [min(vals), statistics.fmean(vals), statistics.pstdev(vals)]
        lines.append("| " + " | ".join([name, *(f"{v:+.3f}" for v in vals + stats)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5])
    parser.add_argument("--paths", nargs="+", default=["pinned", "native"], choices=["pinned", "native"])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with OMP_NUM_THREADS=1 by default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results (or to report on)")
    parser.add_argument("--work", type=Path, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--report", action="store_true", help="print the table of an earlier --out file and stop")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.out.read_text())))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="tiny-spread-"))
    jobs = [(s, p) for s in args.seeds for p in args.paths]
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(launch, s, p, work): (s, p) for s, p in jobs}
        for future in concurrent.futures.as_completed(futures):
            results.append(future.result())
            print(json.dumps(results[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(sorted(results, key=lambda r: (r["path"], r["seed"])), indent=1) + "\n")


if __name__ == "__main__":
    main()
