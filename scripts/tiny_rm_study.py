"""How far the tiny reward model gets with more training and more rankings (docs/tiny.md).

A fresh LoRA (r 16) and a scalar head on an fp32 copy of the tiny base are trained on rankings as
groups: the K responses of a prompt are scored once and all C(K, 2) pairs enter the Bradley-Terry
loss. Every few hundred steps it prints the agreement with the gold ranking on the held-out
rankings, overall and on the pairs where one response is correct and the other wrong.

    python scripts/tiny_rm_study.py --steps 2400            # the bundled 1200 rankings, in epochs
    python scripts/tiny_rm_study.py --steps 2400 --fresh    # new rankings every step (train phrasings)
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import torch


def agreement(score_fn, rows: list[dict]) -> dict[str, float]:
    """Share of held-out pairs ordered as the gold ranking: all of them, and correct vs wrong."""
    from lowmem_rlhf.tiny.task import score_breakdown

    hits = {"all": [0, 0], "correct_vs_wrong": [0, 0]}
    with torch.no_grad():
        for row in rows:
            scores = score_fn(row["prompt"], row["responses"])
            judged = [score_breakdown(row["prompt"], r) for r in row["responses"]]
            for i, j in itertools.combinations(range(len(judged)), 2):  # i is ranked above j
                keys = ["all"] + (["correct_vs_wrong"] if judged[i].correct and judged[j].wrong else [])
                for key in keys:
                    hits[key][0] += bool(scores[i] > scores[j])
                    hits[key][1] += 1
    return {key: round(hit / max(total, 1), 3) for key, (hit, total) in hits.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--groups", type=int, default=8, help="ranked prompts per step (K responses each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fresh", action="store_true", help="generate new rankings instead of the bundled file")
    parser.add_argument("--eval-rows", type=int, default=200, help="held-out rankings to score")
    parser.add_argument("--report-every", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_rlhf.data.batching import pad_sequences
    from lowmem_rlhf.data.chat import encode_prompt, encode_response, to_messages
    from lowmem_rlhf.model.scoring import sequence_scores
    from lowmem_rlhf.tiny import task
    from lowmem_rlhf.tiny.model import build_tiny

    torch.manual_seed(args.seed)
    path = build_tiny()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    def scores(prompts: list[str], responses: list[str]) -> torch.Tensor:
        seqs = [
            encode_prompt(tokenizer, to_messages(p, "study", "prompt")) + encode_response(tokenizer, r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        ids, mask = pad_sequences(seqs, tokenizer.pad_token_id)
        return sequence_scores(model, lambda h: head(h)[:, 0], ids, mask)  # the stages' last-real-token reading

    rng = random.Random(args.seed)
    bundled = task.read_jsonl(task.DATA_DIR / "rankings.jsonl")
    held_out = task.read_jsonl(task.DATA_DIR / "rankings_eval.jsonl")[: args.eval_rows]
    pool = task._pool(task.TRAIN)
    kinds, weights = zip(*task.KIND_WEIGHTS.items(), strict=True)
    order: list[int] = []

    def next_row() -> dict:
        if args.fresh:
            kind = rng.choices(kinds, weights)[0]  # the bundled files' mix of kinds
            return task._ranking_rows(rng, [rng.choice(pool[kind])])[0]
        if not order:
            order.extend(rng.sample(range(len(bundled)), len(bundled)))
        return bundled[order.pop()]

    def score_row(prompt: str, responses: list[str]) -> list[float]:
        return scores([prompt] * len(responses), responses).tolist()

    result: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = [next_row() for _ in range(args.groups)]
        k = len(rows[0]["responses"])
        s = scores([r["prompt"] for r in rows for _ in r["responses"]], [x for r in rows for x in r["responses"]])
        s = s.view(len(rows), k)
        pairs = list(itertools.combinations(range(k), 2))  # best first: i beats j
        loss = torch.stack([-torch.nn.functional.logsigmoid(s[:, i] - s[:, j]) for i, j in pairs]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.report_every == 0 or step == args.steps:
            result = agreement(score_row, held_out)
            print(f"step {step}: loss {loss.item():.3f}, held-out {result}, {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
