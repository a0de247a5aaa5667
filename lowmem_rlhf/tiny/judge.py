"""The bundled task's gold scorer as a judge (and reward function) with the TRL signature.

Name it in a recipe like any user function: `compare.judge: lowmem_rlhf.tiny.judge:gold`,
`ppo.judges: [lowmem_rlhf.tiny.judge:gold]`, or `ppo.reward_funcs: [lowmem_rlhf.tiny.judge:gold]` to
optimise it directly. Prompts that are not the task's get None (the judge does not apply).
"""

from __future__ import annotations

from lowmem_rlhf.tiny.task import gold_score, parse_prompt


def gold(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """`gold_score(prompt, completion)` of each sample; None for a prompt that matches no task template."""
    out: list[float | None] = []
    for p, c in zip(prompts, completions, strict=True):
        try:
            parse_prompt(p)
        except ValueError:
            out.append(None)
            continue
        out.append(gold_score(p, c))
    return out
