"""Gold-score evaluation on the bundled task: sample from a run's policy (or the untrained base) on the
held-out prompts and score the samples with the task's gold scorer.

    python -m lowmem_rlhf.tiny.evaluate runs/tiny [--stages sft ppo] [--n 64]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from lowmem_rlhf.data.chat import encode_prompt, end_of_turn_ids, to_messages
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.rollout.generate import Generation, SamplingConfig, generate
from lowmem_rlhf.tiny.task import DATA_DIR, gold_score, read_jsonl


@dataclass
class GoldReport:
    mean_gold: float
    eos_rate: float
    mean_length: float
    samples: list[tuple[str, str, float]]  # (prompt, response, gold score)


def heldout_prompts(n: int | None = None) -> list[str]:
    rows = read_jsonl(DATA_DIR / "prompts_heldout.jsonl")
    return [r["prompt"] for r in rows[:n]]


def gold_report(
    bank: AdapterBank,
    role: str | None,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    seed: int = 0,
    batch_size: int = 32,
) -> GoldReport:
    """Sample once per prompt from `role` (None = the base without adapters) and gold-score each sample."""
    samples, lengths, ended = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids = [encode_prompt(tokenizer, to_messages(p, "prompt", "prompt")) for p in chunk]
        gen: Generation = generate(
            bank, role, ids, sampling, end_of_turn_ids(tokenizer), tokenizer.pad_token_id, seed + i
        )
        for p, r, e in zip(chunk, gen.response_ids, gen.ended, strict=True):
            text = tokenizer.decode(r, skip_special_tokens=True).strip()
            samples.append((p, text, gold_score(p, text)))
            lengths.append(len(r))
            ended.append(e)
    return GoldReport(
        mean_gold=statistics.fmean(s[2] for s in samples),
        eos_rate=sum(ended) / len(ended),
        mean_length=statistics.fmean(lengths),
        samples=samples,
    )


def main(argv: list[str] | None = None) -> None:
    from lowmem_rlhf.config import config_from_dict, read_recipe
    from lowmem_rlhf.logs import setup_logging
    from lowmem_rlhf.model.loading import load_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument(
        "--stages", nargs="+", default=["sft", "ppo", "dpo"], help="stage adapters to compare (if present)"
    )
    parser.add_argument("--n", type=int, default=64, help="held-out prompts to sample (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--show", type=int, default=5, help="samples to print per model")
    args = parser.parse_args(argv)
    setup_logging(verbose=False)
    run_dir = Path(args.run_dir)
    cfg = config_from_dict(read_recipe(run_dir / "config.yaml"), where=str(run_dir / "config.yaml"))
    model, tokenizer = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=False)
    stages = [s for s in args.stages if (run_dir / s / "adapter_config.json").is_file()]
    for stage in stages:
        bank.add_role(stage, from_dir=run_dir / stage)
    prompts = heldout_prompts(args.n)
    sampling = SamplingConfig(max_new_tokens=32, temperature=args.temperature)
    for label, role in [("untrained base", None), *[(s, s) for s in stages]]:
        rep = gold_report(bank, role, tokenizer, prompts, sampling)
        print(
            f"{label}: mean gold score {rep.mean_gold:+.3f} on {len(prompts)} held-out prompts "
            f"(EOS rate {rep.eos_rate:.0%}, mean length {rep.mean_length:.1f} tokens)"
        )
        for p, r, g in rep.samples[: args.show]:
            print(f"    {p!r} -> {r!r}  [gold {g:+.2f}]")


if __name__ == "__main__":
    main()
