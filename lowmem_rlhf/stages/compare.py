"""`compare`: every trained policy (PPO, GRPO, RLOO, ReMax, DPO) beside its SFT policy, on the same prompts.

One base model is loaded; each run's SFT adapter, trained policies and reward model are roles on it.
Every policy samples the same held-out prompts with the same seeds and sampling settings, so a
policy's sample of a prompt and its SFT policy's sample share their random numbers. Each sample is
scored by a reward model and by every judge of `compare.judge` / `--judge` (functions with the
reward-function signature, lowmem_rlhf.rewards; the bundled tiny task's is `lowmem_rlhf.tiny.judge:gold`),
each stored under its own name; its log-prob is taken
under the policy and under the run's SFT adapter (the reference of both PPO and DPO), so
`kl` = Σ_t log π − log π_SFT over the response, whose mean over samples estimates KL(π ‖ π_SFT).

Output folder (`output_dir/compare/` as a pipeline stage, or `--output`):
  samples.jsonl   every sample with its numbers; `summarize` recomputes the report from it alone
  report.json     settings, per-policy numbers, training curves' sources
  report.md       the table, the plots and a few side-by-side samples
  reward_vs_kl.png, training.png, lengths.png
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_rlhf.config import CompareConfig, ModelConfig, RecipeConfig
from lowmem_rlhf.data.batching import pad_sequences
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.prompts import prompt_columns, tokenize_prompts
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATORS
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.forward import response_logprob_sums
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.model.scoring import sequence_scores
from lowmem_rlhf.progress import Progress
from lowmem_rlhf.rewards import RewardFunction, load_reward_fns, score_samples
from lowmem_rlhf.rollout.generate import SamplingConfig, generate
from lowmem_rlhf.stages.common import (
    STAGE_DIRS,
    Manifest,
    begin_stage,
    locked_stage,
    read_run,
    read_stage_settings,
    stage_model,
    stage_settings,
)
from lowmem_rlhf.train.io import atomic_write_json, atomic_write_text, strict_dumps
from lowmem_rlhf.train.metrics import read_metrics
from lowmem_rlhf.train.runner import fingerprint

logger = logging.getLogger(__name__)

POLICY_STAGES = ("ppo", "dpo")
# The settings of the base that every compared run must share (they are sampled on one loaded base).
BASE_KEYS = ("name_or_path", "revision", "quantization", "double_quant", "compute_dtype")
PLOTS = ("reward_vs_kl.png", "training.png", "lengths.png")
# The keys of a sample row; any other key is a judge's score, named after the judge.
ROW_KEYS = (
    "policy",
    "baseline",
    "prompt_index",
    "prompt",
    "response",
    "length",
    "eos",
    "reward",
    "logp",
    "ref_logp",
    "kl",
)


@dataclass
class Run:
    path: Path
    name: str
    cfg: RecipeConfig  # config.yaml: the latest invocation in that folder
    stages: dict  # manifest entries of the finished stages
    settings: dict  # stage -> the settings it ran with (its settings.yaml; None for older folders)
    model: ModelConfig  # the base the run's SFT stage was trained on


@dataclass
class Policy:
    label: str  # "tiny/ppo", "tiny/dpo", "tiny/sft"
    run: Run
    stage: str  # "sft", "ppo" or "dpo"
    method: str  # "sft", "dpo", or the RL estimator's label ("ppo", "grpo", ...; lowmem_rlhf/estimators.py)
    role: str  # adapter name on the shared bank
    sft_role: str  # the run's SFT adapter: reference of the KL and baseline of the win rates
    reward_role: str | None


# ----------------------------------------------------------------------------------------------------
# runs


def open_run(path: str | Path, trust_remote_code: bool = False) -> Run:
    """A run folder with its resolved config and finished stages; a clear error for anything else."""
    run, cfg = read_run(path, trust_remote_code)
    stages = Manifest(run).data["stages"]
    if "sft" not in stages:
        raise UserError(f"{run}: compare needs the run's finished sft stage (its policies' reference and baseline)")
    settings = {s: read_stage_settings(run / STAGE_DIRS[s]) for s in stages if s in STAGE_DIRS}
    model = stage_model(run / STAGE_DIRS["sft"], cfg, trust_remote_code)
    return Run(run, run.resolve().name, cfg, stages, settings, model)


def method_of(run: Run, stage: str) -> str:
    """The method that trained `stage`, from the settings it ran with (config.yaml may be a later invocation's)."""
    if stage != "ppo":
        return stage
    recorded = (run.settings.get("ppo") or {}).get("ppo") or {}
    return ESTIMATORS[recorded.get("advantage", run.cfg.ppo.advantage)].label


def build_policies(runs: list[Run], reward_from: Run | None) -> tuple[list[Policy], dict[str, Path]]:
    """The policies to sample (each run's SFT first, then its ppo and dpo) and the adapter folder of each role.

    Reward roles are named `*_reward`; they load their score head.
    """
    names = [r.name for r in runs]
    policies, dirs = [], {}
    if reward_from is not None:
        if "rm" not in reward_from.stages:
            raise UserError(f"--reward-from {reward_from.path}: that run has no finished rm stage")
        dirs["judge_reward"] = reward_from.path / STAGE_DIRS["rm"]
    for i, run in enumerate(runs):
        # Two folders with the same name (a/tiny, b/tiny) are labelled by their path.
        name = run.name if names.count(run.name) == 1 else str(run.path)
        reward_role = None
        if reward_from is not None:
            reward_role = "judge_reward"
        elif "rm" in run.stages:
            reward_role = f"run{i}_reward"
            dirs[reward_role] = run.path / STAGE_DIRS["rm"]
        sft_role = f"run{i}_sft"
        dirs[sft_role] = run.path / STAGE_DIRS["sft"]
        policies.append(Policy(f"{name}/sft", run, "sft", "sft", sft_role, sft_role, reward_role))
        for stage in POLICY_STAGES:
            if stage in run.stages:
                role = f"run{i}_{stage}"
                dirs[role] = run.path / STAGE_DIRS[stage]
                method = method_of(run, stage)
                policies.append(Policy(f"{name}/{method}", run, stage, method, role, sft_role, reward_role))
    if len(policies) == len(runs):
        raise UserError(
            f"no finished ppo or dpo stage in {', '.join(str(r.path) for r in runs)}; nothing to compare with SFT"
        )
    base = {k: getattr(runs[0].model, k) for k in BASE_KEYS}
    for run in runs[1:]:
        other = {k: getattr(run.model, k) for k in BASE_KEYS}
        if other != base:
            diff = ", ".join(f"model.{k}: {base[k]!r} vs {other[k]!r}" for k in BASE_KEYS if base[k] != other[k])
            raise UserError(
                f"compare loads one base model, but {run.path} and {runs[0].path} differ ({diff}); "
                "compare them separately"
            )
    return policies, dirs


# ----------------------------------------------------------------------------------------------------
# sampling and scoring


@torch.no_grad()
def collect_samples(
    bank: AdapterBank,
    tokenizer,
    policies: list[Policy],
    prompts: list[list[int]],
    texts: list[str],
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
    chunk_size: int,
    judges: list[RewardFunction],
    columns: dict[str, list],
    source: str,
) -> list[dict]:
    """One sample per prompt and policy, with its reward, judges' scores, log-probs, length and EOS flag."""
    # Log-probs under the distribution that was sampled (the model's own for greedy decoding).
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    eos, pad = end_of_turn_ids(tokenizer), tokenizer.pad_token_id
    rows = []
    batches = range(0, len(prompts), batch_size)
    with Progress("compare: sampling", len(policies) * len(prompts), "samples", logger) as progress:
        for policy in policies:
            baseline = None if policy.stage == "sft" else next(p.label for p in policies if p.role == policy.sft_role)
            for start in batches:
                chunk = prompts[start : start + batch_size]
                gen = generate(bank, policy.role, chunk, sampling, eos, pad, seed + start)
                with bank.use(policy.role) as m:
                    logp = response_logprob_sums(m, chunk, gen.response_ids, pad, chunk_size, temperature)
                if policy.role == policy.sft_role:
                    ref = logp
                else:
                    with bank.use(policy.sft_role) as m:
                        ref = response_logprob_sums(m, chunk, gen.response_ids, pad, chunk_size, temperature)
                rewards = [None] * len(chunk)
                if policy.reward_role is not None:
                    ids, mask = pad_sequences([p + r for p, r in zip(chunk, gen.response_ids, strict=True)], pad)
                    with bank.use(policy.reward_role) as m:
                        head = bank.head(policy.reward_role)
                        rewards = sequence_scores(m, head, ids.to(bank.device), mask.to(bank.device)).tolist()
                responses = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in gen.response_ids]
                index = list(range(start, start + len(chunk)))
                judged = score_samples(judges, texts, columns, index, responses, gen.response_ids, source)
                for j, response in enumerate(gen.response_ids):
                    text = responses[j]
                    rows.append(
                        {
                            "policy": policy.label,
                            "baseline": baseline,
                            "prompt_index": start + j,
                            "prompt": texts[start + j],
                            "response": text,
                            "length": len(response),
                            "eos": gen.ended[j],
                            "reward": rewards[j],
                            "logp": float(logp[j]),
                            "ref_logp": float(ref[j]),
                            "kl": float(logp[j] - ref[j]),
                            **{name: scores[j] for name, scores in judged.items()},
                        }
                    )
                progress.update(len(chunk))
    return rows


# ----------------------------------------------------------------------------------------------------
# the numbers


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _win_rate(mine: dict[int, float | None], theirs: dict[int, float | None]) -> float | None:
    """Share of prompts where my sample scores above the baseline's; a tie counts half."""
    pairs = [(mine[i], theirs[i]) for i in mine if mine[i] is not None and theirs.get(i) is not None]
    if not pairs:
        return None
    return statistics.fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)


def judge_names(samples: list[dict]) -> list[str]:
    """The judges whose scores the sample rows hold (every key that is not a ROW_KEYS one)."""
    return [k for k in samples[0] if k not in ROW_KEYS] if samples else []


def summarize(samples: list[dict]) -> dict[str, dict]:
    """Per-policy numbers, computed from the sample rows alone (the report is reproducible from samples.jsonl).

    Each judge gets its mean under its name and `win_rate_<name>`, beside the reward model's.
    """
    judges = judge_names(samples)
    by_policy: dict[str, list[dict]] = {}
    for row in samples:
        by_policy.setdefault(row["policy"], []).append(row)
    out = {}
    for label, rows in by_policy.items():
        baseline = rows[0]["baseline"]
        entry = {
            "baseline": baseline,
            "samples": len(rows),
            "reward": _mean([r["reward"] for r in rows]),
            **{name: _mean([r[name] for r in rows]) for name in judges},
            "kl": _mean([r["kl"] for r in rows]),
            "length": _mean([r["length"] for r in rows]),
            "eos_rate": _mean([float(r["eos"]) for r in rows]),
            "win_rate_reward": None,
            **{f"win_rate_{name}": None for name in judges},
        }
        if baseline is not None:
            base_rows = by_policy[baseline]
            for key in ("reward", *judges):
                entry[f"win_rate_{key}"] = _win_rate(
                    {r["prompt_index"]: r[key] for r in rows}, {r["prompt_index"]: r[key] for r in base_rows}
                )
        out[label] = entry
    return out


def training_usage(policy: Policy) -> dict:
    """Training wall time and peak memory from the manifest: the policy's own stage and its whole chain."""
    chain = {"sft": ["sft"], "dpo": ["sft", "dpo"], "ppo": ["sft", "rm", "ppo"]}[policy.stage]
    stages = policy.run.stages
    own = stages[policy.stage].get("metrics", {})
    times = [stages[s].get("metrics", {}).get("elapsed_s") for s in chain if s in stages]
    out: dict = {
        "train_steps": stages[policy.stage].get("steps"),
        "train_time_s": own.get("elapsed_s"),
        "pipeline_time_s": sum(times) if times and None not in times else None,
    }
    for key in ("peak_gpu_memory_gb", "peak_rss_gb"):
        peaks = [stages[s].get("metrics", {}).get(key) for s in chain if s in stages]
        peaks = [p for p in peaks if p is not None]
        if peaks:
            out[key] = max(peaks)
    return out


def training_curves(policy: Policy) -> dict[str, list[tuple[int, float]]]:
    """Reward and KL over training steps from the stage's metrics.jsonl."""
    if policy.stage == "sft":
        return {}
    rows = read_metrics(policy.run.path / STAGE_DIRS[policy.stage] / "metrics.jsonl")
    # the raw RM score; an RL run without a reward model shows the score it optimised
    rl_reward = "reward_raw" if any("reward_raw" in r for r in rows) else "reward"
    keys = {"ppo": {"reward": rl_reward, "kl": "kl"}, "dpo": {"margin": "margin", "kl": "sample_kl"}}[policy.stage]
    return {
        name: [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        for name, key in keys.items()
    }


# ----------------------------------------------------------------------------------------------------
# writing


def _fmt(v, spec: str = "+.3f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _judges_of(summary: dict) -> list[str]:
    """Judge names in a summary: the keys with a `win_rate_` twin, other than the reward model's."""
    first = next(iter(summary.values()), {})
    return [k.removeprefix("win_rate_") for k in first if k.startswith("win_rate_") and k != "win_rate_reward"]


def table_header(judges: list[str]) -> list[str]:
    return [
        "policy",
        "reward",
        *judges,
        "win vs SFT (RM)",
        *(f"win vs SFT ({j})" for j in judges),
        "KL",
        "length",
        "EOS",
        "train time",
        "peak mem",
    ]


def table_rows(summary: dict, usage: dict) -> list[list[str]]:
    judges = _judges_of(summary)
    rows = []
    for label, s in summary.items():
        u = usage.get(label, {})
        mem = u.get("peak_gpu_memory_gb")
        mem_s = _fmt(mem, ".2f", " GB GPU") if mem is not None else _fmt(u.get("peak_rss_gb"), ".2f", " GB RSS")
        rows.append(
            [
                label,
                _fmt(s["reward"]),
                *(_fmt(s[j]) for j in judges),
                _fmt(s["win_rate_reward"], ".0%"),
                *(_fmt(s[f"win_rate_{j}"], ".0%") for j in judges),
                _fmt(s["kl"], ".2f"),
                _fmt(s["length"], ".1f"),
                _fmt(s["eos_rate"], ".0%"),
                _fmt(u.get("train_time_s"), ".0f", " s"),
                mem_s,
            ]
        )
    return rows


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])


def write_plots(out: Path, summary: dict, curves: dict, samples: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = {label: f"C{i % 10}" for i, label in enumerate(summary)}  # one colour per policy in every plot
    keys = ("reward", *_judges_of(summary))
    scores = [k for k in keys if any(s[k] is not None for s in summary.values())] or ["reward"]
    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 4.2), squeeze=False)
    for ax, key in zip(axes[0], scores, strict=True):
        for label, s in summary.items():
            if s[key] is None or s["kl"] is None:
                continue
            ax.scatter(s["kl"], s[key], s=60, color=color[label], marker="s" if s["baseline"] is None else "o")
            ax.annotate(label, (s["kl"], s[key]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("KL to the SFT reference (nats per response)")
        ax.set_ylabel("mean reward-model score" if key == "reward" else f"mean score of judge {key}")
        ax.set_title(f"{key} vs KL")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = [
        (axes[0], "reward", "RL: mean raw RM reward (without an RM: the score) of each rollout"),
        (axes[1], "margin", "DPO: implicit reward margin (train)"),
        (axes[2], "kl", "KL to the reference (RL rollouts; DPO samples at evals)"),
    ]
    for ax, key, title in panels:
        drawn = False
        for label, c in curves.items():
            if c.get(key):
                steps, values = zip(*c[key], strict=True)
                ax.plot(steps, values, color=color[label], marker="o" if len(steps) < 12 else None, ms=3, label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no such run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lengths = {label: [r["length"] for r in samples if r["policy"] == label] for label in summary}
    top = max(max(v) for v in lengths.values())
    bins = range(0, top + 2)
    for label, v in lengths.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, color=color[label], label=label)
    ax.set_xlabel("response length (tokens, EOS included)")
    ax.set_ylabel("samples")
    ax.set_title("response lengths (same prompts and seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=110)
    plt.close(fig)


def write_markdown(out: Path, report: dict, samples: list[dict], examples: int = 3) -> None:
    s = report["settings"]
    rows = table_rows(report["policies"], report["training"])
    header = table_header(_judges_of(report["policies"]))
    judges = ", ".join(f"**{j}**" for j in _judges_of(report["policies"]))
    md = [
        "# PPO vs DPO: compare report",
        "",
        f"Runs: {', '.join(f'`{r}`' for r in report['runs'])}. "
        f"{s['num_prompts']} prompts from `{s['prompts']}`, one sample each per policy, the same seeds "
        f"(seed {s['seed']}) and sampling settings for every policy: temperature {s['temperature']}, "
        f"top_p {s['top_p']}, top_k {s['top_k']}, at most {s['max_new_tokens']} new tokens.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "- **reward**: mean score of "
        + (f"the reward model in `{s['reward_from']}`" if s["reward_from"] else "each run's own reward model")
        + " (raw, before PPO's normalisation)"
        + (f"; {judges}: the mean score of that judge ({', '.join(f'`{x}`' for x in s['judges'])})" if judges else "")
        + ".",
        "- **win vs SFT**: share of prompts where the policy's sample scores above its run's SFT sample "
        "(a tie counts half).",
        "- **KL**: mean over samples of Σ_t log π − log π_SFT over the response tokens (the reference of "
        "both PPO and DPO is the SFT adapter), at the sampling temperature.",
        *(
            [
                "- With greedy decoding (temperature 0) the KL column is the mean log-ratio of the greedy "
                "responses, not an estimate of the KL."
            ]
            if s["temperature"] == 0
            else []
        ),
        "- **length**: response tokens, EOS included; **EOS**: share of responses that ended with EOS "
        "rather than at the token limit.",
        "- **train time**: wall time of the policy's own training stage (SFT and the reward model not "
        "included; `report.json` has `pipeline_time_s` with them); **peak mem**: the highest peak of the "
        "stages it depends on (CUDA max allocated on a GPU, the process's peak RSS on CPU).",
        "",
        "## Plots",
        "",
        "![reward vs KL](reward_vs_kl.png)",
        "",
        "![training curves](training.png)",
        "",
        "![response lengths](lengths.png)",
        "",
        "## Samples",
        "",
    ]
    by_prompt: dict[int, list[dict]] = {}
    for row in samples:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    for i in sorted(by_prompt)[:examples]:
        group = by_prompt[i]
        md += [f"**Prompt:** {group[0]['prompt']}", ""]
        for row in group:
            scores = ", ".join(f"{k} {row[k]:+.2f}" for k in ("reward", *judge_names(samples)) if row[k] is not None)
            md.append(f"- `{row['policy']}` ({scores}): {row['response']!r}")
        md.append("")
    atomic_write_text(out / "report.md", "\n".join(md))


# ----------------------------------------------------------------------------------------------------
# entry points


def compare_runs(
    run_dirs: list[str | Path], cc: CompareConfig, seed: int, out: str | Path, trust_remote_code: bool = False
) -> dict:
    """Sample, score and report; returns the report (also written to `out/report.json`).

    `trust_remote_code` allows runs whose config.yaml sets `model.trust_remote_code: true`.
    """
    runs = [open_run(p, trust_remote_code) for p in run_dirs]
    paths = [r.path.resolve() for r in runs]
    if len(set(paths)) != len(paths):
        raise UserError("the same run folder is listed twice")
    reward_from = open_run(cc.reward_from, trust_remote_code) if cc.reward_from else None
    judges = load_reward_fns(cc.judge, "judge")
    policies, dirs = build_policies(runs, reward_from)
    first = runs[0].cfg
    source = cc.prompts or first.ppo.eval_dataset
    if source is None:
        raise UserError(
            "compare needs held-out prompts: pass --prompts FILE (or set compare.prompts, or ppo.eval_dataset)"
        )
    split = cc.split if cc.prompts else first.ppo.eval_split
    rows, name = load_rows(source, split)
    if cc.num_prompts:
        rows = rows[: cc.num_prompts]
    if not rows:
        raise UserError(f"{name}: no prompts")
    columns = prompt_columns(rows)
    for judge in judges:
        judge.check_call(list(columns))

    model, tokenizer = load_base(runs[0].model)
    prompts, texts, cut = tokenize_prompts(rows, tokenizer, cc.max_prompt_length, name)
    if cut:
        logger.warning("%s: %d prompts were longer than max_prompt_length and were cut from the left", name, cut)
    bank = AdapterBank(model, gradient_checkpointing=False)
    for role, folder in dirs.items():
        bank.add_role(role, from_dir=folder, head=role.endswith("_reward"))
    bank.disable_dropout()
    sampling = SamplingConfig(cc.max_new_tokens, cc.temperature, cc.top_p, cc.top_k)
    logger.info(
        "compare: %d policies x %d prompts (%s)", len(policies), len(prompts), ", ".join(p.label for p in policies)
    )
    samples = collect_samples(
        bank,
        tokenizer,
        policies,
        prompts,
        texts,
        sampling,
        seed,
        cc.batch_size,
        runs[0].model.logprob_chunk_size,
        judges,
        columns,
        name,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.jsonl", "".join(strict_dumps(r, ensure_ascii=False) + "\n" for r in samples))
    summary = summarize(samples)
    report = {
        "runs": [str(r.path) for r in runs],
        "settings": {
            "prompts": source,
            "num_prompts": len(prompts),
            "seed": seed,
            "max_new_tokens": cc.max_new_tokens,
            "temperature": cc.temperature,
            "top_p": cc.top_p,
            "top_k": cc.top_k,
            "reward_from": cc.reward_from,
            "judges": [j.spec for j in judges],
        },
        "order": list(summary),  # the policies in sampling order (each run's SFT first)
        "policies": summary,
        "training": {p.label: training_usage(p) for p in policies},
        "stages": {p.label: {"run": str(p.run.path), "stage": p.stage, "method": p.method} for p in policies},
    }
    atomic_write_json(out / "report.json", report)
    write_plots(out, summary, {p.label: training_curves(p) for p in policies}, samples)
    write_markdown(out, report, samples)
    print(format_table(table_rows(summary, report["training"]), table_header(_judges_of(summary))))
    print(f"report: {out / 'report.md'} (plots: {', '.join(str(out / p) for p in PLOTS)})")
    return report


@locked_stage
def run(cfg: RecipeConfig, force: bool = False) -> Path:
    """The pipeline's compare stage: this run's policies (and `compare.runs`) -> `output_dir/compare/`."""
    stage_dir, manifest, done = begin_stage(cfg, "compare", force)
    if done:
        return stage_dir
    # The recipe's own trust_remote_code is the user's explicit choice for the runs it lists.
    report = compare_runs(
        [cfg.output_dir, *cfg.compare.runs], cfg.compare, cfg.seed, stage_dir, cfg.model.trust_remote_code
    )
    manifest.mark_finished(
        "compare",
        {
            "path": STAGE_DIRS["compare"],
            "policies": report["policies"],
            "settings": fingerprint(stage_settings(cfg, "compare")),
        },
    )
    return stage_dir
