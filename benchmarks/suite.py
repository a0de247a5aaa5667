"""The whole benchmark suite in one command, and its summary as JSON and a markdown table.

Every benchmark runs in its own Python process (a clean CUDA allocator and compile cache each, and one
that runs out of memory does not stop the others), writes its JSON into `--results-dir`, and the suite
then reads every JSON there into `summary.json` and `summary.md`.

    python -m benchmarks.suite                                  # every benchmark, three shapes, on the GPU
    python -m benchmarks.suite --shapes llama-3.1-8b --only ppo rollout
    python -m benchmarks.suite --summarize-only                 # rebuild summary.md from the JSON files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sft_bench import RESULTS_DIR
from benchmarks.shapes import SHAPES as KNOWN_SHAPES

SHAPES = ("qwen2.5-0.5b", "llama-3.2-3b", "llama-3.1-8b")


@dataclass(frozen=True)
class Job:
    """One benchmark run: `python -m benchmarks.<module> <argv> --shape S --out <results>/<name>_<S>.json`."""

    name: str
    module: str
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...]  # the same path at smoke-test size (CPU, tiny shape)


def _a(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The settings of each benchmark; the full ones are the design's and the (see benchmarks/README.md).
JOBS = (
    Job(
        "sft",
        "sft_bench",
        _a("--batch 2 --seq 2048 --steps 5 --warmup 2"),
        _a("--batch 2 --seq 32 --steps 1 --warmup 1"),
    ),
    Job(
        "rm",
        "preference_bench",
        _a("--stage rm --batch 2 --seq 1024 --steps 5 --warmup 2"),
        _a("--stage rm --batch 2 --seq 32 --steps 1 --warmup 1"),
    ),
    Job(
        "dpo",
        "preference_bench",
        _a("--stage dpo --batch 2 --seq 1024 --steps 5 --warmup 2"),
        _a("--stage dpo --batch 2 --seq 32 --steps 1 --warmup 1"),
    ),
    Job(
        "ppo",
        "ppo_bench",
        _a("--prompts 16 --prompt-len 256 --new-tokens 256 --micro-batch 4 --steps 2 --warmup 1 --mode both"),
        _a("--prompts 4 --prompt-len 8 --new-tokens 8 --micro-batch 2 --steps 1 --warmup 0 --mode both"),
    ),
    Job(
        "grpo",
        "trl_grpo_bench",
        _a("--prompts 4 --group-size 4 --prompt-len 256 --new-tokens 256 --micro-batch 4 --steps 2 --warmup 1")
        + ("--with-ours",),
        _a("--prompts 2 --group-size 2 --prompt-len 8 --new-tokens 8 --micro-batch 2 --steps 1 --warmup 0 --with-ours"),
    ),
    Job(
        "rollout",
        "rollout_bench",
        _a("--calls 2 --prompt-len 256 --new-tokens 256 --batch-sizes 1 16 64"),
        _a("--calls 1 --prompt-len 8 --new-tokens 8 --batch-sizes 2 4 --variants dynamic static base"),
    ),
)
JOB_NAMES = tuple(j.name for j in JOBS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", nargs="+", choices=sorted(KNOWN_SHAPES), default=list(SHAPES), help="Model shapes, random weights."
    )
    p.add_argument("--only", nargs="+", choices=JOB_NAMES, default=list(JOB_NAMES), help="Benchmarks to run.")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (cpu is a smoke test only).")
    p.add_argument(
        "--quick", action="store_true", help="Smoke-test sizes (a few tokens, one step): checks the paths, not speed."
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="Where the JSON files and summaries go.")
    p.add_argument("--cache-dir", type=Path, default=None, help="Random-weight checkpoint cache (see sft_bench).")
    p.add_argument(
        "--timeout", type=int, default=3600, help="Seconds one benchmark may run before it is stopped (and failed)."
    )
    p.add_argument(
        "--summarize-only", action="store_true", help="Run nothing; rebuild the summaries from the results folder."
    )
    return p.parse_args(argv)


def command(job: Job, shape: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of `job` on `shape`."""
    cmd = [sys.executable, "-m", f"benchmarks.{job.module}", *(job.quick_argv if args.quick else job.argv)]
    cmd += ["--shape", shape, "--device", args.device, "--out", str(out)]
    return cmd + (["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])


def run_jobs(args: argparse.Namespace) -> list[dict]:
    """Run every selected job on every shape, each in its own process; returns one status row per run."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if args.device in ("auto", "cuda"):  # one GPU per benchmark (TRL's trainer refuses several)
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    statuses = []
    for shape in args.shapes:
        for job in (j for j in JOBS if j.name in args.only):
            out = args.results_dir / f"{job.name}_{shape}.json"
            out.unlink(missing_ok=True)  # a failed run must not leave an older result in the summary
            cmd = command(job, shape, args, out)
            print(f"[suite] {job.name} on {shape}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout)
                returncode, output = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                returncode = None
                output = f"{_text(e.stdout)}{_text(e.stderr)}\nstopped after --timeout {args.timeout} s"
            seconds = time.perf_counter() - t0
            ok = returncode == 0 and out.is_file()
            tail = "\n".join(output.strip().splitlines()[-15:])
            print(output.strip() if ok else tail, flush=True)
            print(f"[suite] {job.name} on {shape}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
            statuses.append(
                {
                    "job": job.name,
                    "shape": shape,
                    "ok": ok,
                    "returncode": returncode,
                    "seconds": seconds,
                    "command": " ".join(["python", *cmd[1:]]),
                    "output_tail": None if ok else tail,
                }
            )
    return statuses


def _text(stream: bytes | str | None) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""


# ---------------------------------------------------------------------------------------------------- summary


def _f(x: float | None, fmt: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "missed", None: "n/a"}[met]


def _estimate_cells(record: dict) -> list[str]:
    """The estimate and its error, then the memory tracer's figure for the same settings and the measured peak's
    offset from it (measured / traced - 1)."""
    e = record.get("estimate") or {}
    t = record.get("tracer") or {}
    return [
        _f(e.get("predicted_allocated_gib")),
        _pct(e.get("error")),
        _f(t.get("traced_peak_gib")),
        _pct(t.get("offset")),
    ]


def stage_rows(records: dict[str, dict]) -> list[list[str]]:
    """Peak memory, estimator and speed per (shape, stage)."""
    rows = []
    order = {name: i for i, name in enumerate(JOB_NAMES)}
    for key, r in sorted(records.items(), key=lambda kv: (kv[0].split("_", 1)[1], order[kv[0].split("_", 1)[0]])):
        job, shape = key.split("_", 1)
        m = r["measurements"]
        if job == "sft":
            rows.append(
                [
                    shape,
                    "SFT",
                    _f(m["peak_allocated_gib"]),
                    *_estimate_cells(r),
                    _f(m["tokens_per_s"], ".0f"),
                    "tokens/s",
                ]
            )
        elif job in ("rm", "dpo"):
            rows.append(
                [shape, job.upper(), _f(m["peak_allocated_gib"]), *_estimate_cells(r), _f(m["pairs_per_s"]), "pairs/s"]
            )
        elif job == "ppo":
            sh = m["shared"]
            rows.append(
                [
                    shape,
                    "PPO (4 roles)",
                    _f(sh["peak_allocated_gib"]),
                    *_estimate_cells(r),
                    _f(sh["s_per_ppo_step"]),
                    "s/step",
                ]
            )
        elif job == "grpo" and "ours" in r:
            ours = r["ours"]
            sh = ours["measurements"]["shared"]
            rows.append(
                [
                    shape,
                    "GRPO",
                    _f(sh["peak_allocated_gib"]),
                    *_estimate_cells(ours),
                    _f(sh["s_per_ppo_step"]),
                    "s/step",
                ]
            )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render_markdown(records: dict[str, dict], statuses: list[dict]) -> str:
    """The summary page: one table per question the suite answers, then the runs that failed."""
    first = next(iter(records.values()), None)
    lines = ["# Benchmark results", ""]
    if first is None:
        lines += ["No results yet: run `python -m benchmarks.suite` on a CUDA machine.", ""]
    else:
        v = first["versions"]
        libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "transformers", "peft", "bitsandbytes") if v.get(k))
        lines += [f"Device: **{first['device']}**. {libs}. Model weights are random (real shapes)."]
        lines += [
            "Memory is `torch.cuda.max_memory_allocated` in GiB; the estimate is `lowmem-rlhf estimate`'s; traced is "
            "`python -m benchmarks.memory`'s peak for the same settings (the paged optimizer's unified memory left "
            "out), and offset is measured / traced - 1.",
            "",
        ]
    rows = stage_rows(records)
    if rows:
        lines += ["## Peak memory and speed per stage", ""]
        header = [
            "shape",
            "stage",
            "peak GiB",
            "estimate GiB",
            "estimate error",
            "traced GiB",
            "offset",
            "speed",
            "unit",
        ]
        lines += [*_table(header, rows), ""]
    ppo = [(k.split("_", 1)[1], r) for k, r in sorted(records.items()) if k.startswith("ppo_")]
    ppo = [(s, r) for s, r in ppo if "separate" in r["measurements"]]
    if ppo:
        lines += ["## One shared 4-bit backbone against four separately loaded models (PPO)", ""]
        rows = []
        for shape, r in ppo:
            m = r["measurements"]
            ratio = m["memory_ratio"]
            rows.append(
                [
                    shape,
                    _f(m["shared"]["peak_allocated_gib"]),
                    _f(m["separate"]["peak_allocated_gib"]),
                    _f(ratio, ".3f"),
                    _verdict(r["targets"]["memory_ratio"]["met"]),
                    _verdict(r["targets"]["peak_allocated"]["met"]),
                ]
            )
        header = ["shape", "shared GiB", "separate GiB", "ratio", "ratio <= 0.4", "8B peak <= 9.5 GB"]
        lines += [*_table(header, rows), ""]
    grpo = [(k.split("_", 1)[1], r) for k, r in sorted(records.items()) if k.startswith("grpo_") and "comparison" in r]
    if grpo:
        lines += ["## Our GRPO against TRL's GRPOTrainer (same model, data and settings)", ""]
        rows = []
        for shape, r in grpo:
            c = r["comparison"]
            rows.append(
                [
                    shape,
                    _f(c["ours_s_per_step"]),
                    _f(c["trl_s_per_step"]),
                    _f(c["speedup"], ".2f", "x"),
                    _f(c["ours_peak_allocated_gib"]),
                    _f(c["trl_peak_allocated_gib"]),
                    _verdict(c["targets"]["met"]),
                ]
            )
        header = ["shape", "ours s/step", "TRL s/step", "speedup", "ours GiB", "TRL GiB", "faster at <= memory"]
        lines += [*_table(header, rows), ""]
    rollout = [(k.split("_", 1)[1], r) for k, r in sorted(records.items()) if k.startswith("rollout_")]
    if rollout:
        lines += ["## Rollout decode against the memory-bandwidth floor", ""]
        rows = []
        for shape, r in rollout:
            for run in r["measurements"]["runs"]:
                rows.append(
                    [
                        shape,
                        run["variant"],
                        str(run["batch_size"]),
                        _f(run["decode_tokens_per_s"], ".0f"),
                        _f(run["bandwidth_floor_tokens_per_s"], ".0f"),
                        _f(run["decode_fraction_of_floor"], ".1%"),
                    ]
                )
        header = ["shape", "variant", "rows/call", "decode tokens/s", "floor tokens/s", "of floor"]
        lines += [*_table(header, rows), ""]
    failed = [s for s in statuses if not s["ok"]]
    if failed:
        lines += ["## Runs that failed", ""]
        for s in failed:
            how = "timed out" if s["returncode"] is None else f"exit {s['returncode']}"
            lines += [
                f"- `{s['command']}` ({how}):",
                "",
                "  ```",
                *("  " + x for x in s["output_tail"].splitlines()),
                "  ```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def read_records(results_dir: Path) -> dict[str, dict]:
    """Every suite result JSON in the folder, keyed `<job>_<shape>` (the file name without .json).

    Files the benchmarks write on their own (`<name>_<shape>_<device>.json`) share the folder and are left out.
    """
    records = {}
    for path in sorted(results_dir.glob("*.json")):
        job, _, shape = path.stem.partition("_")
        if job in JOB_NAMES and shape in KNOWN_SHAPES:
            records[path.stem] = json.loads(path.read_text())
    return records


def write_summary(results_dir: Path, statuses: list[dict]) -> Path:
    """Write summary.json (statuses and the headline numbers) and summary.md; returns the markdown path."""
    records = read_records(results_dir)
    md = results_dir / "summary.md"
    md.write_text(render_markdown(records, statuses))
    (results_dir / "summary.json").write_text(
        json.dumps(
            {
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "runs": statuses,
                "results": sorted(records),
            },
            indent=2,
        )
        + "\n"
    )
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    statuses = [] if args.summarize_only else run_jobs(args)
    md = write_summary(args.results_dir, statuses)
    print(md.read_text())
    print(f"[suite] summary: {md}")
    return int(any(not s["ok"] for s in statuses))


if __name__ == "__main__":
    sys.exit(main())
