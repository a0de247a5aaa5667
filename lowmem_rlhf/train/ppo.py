"""The RL loop on one backbone: PPO with a critic (GAE), or critic-free GRPO / RLOO / ReMax / REINFORCE++.

Every model is a role of the same AdapterBank: `policy` (trainable), `reference` (frozen copy of
SFT), `reward` (frozen RM + score head) and, for GAE, `value` (trainable, from the RM) or a value
head on the policy (`critic: shared`). One iteration reads like the algorithm:

    1. rollout      sample responses from the policy (eval mode, KV cache, stop at EOS)
    2. score        reward role at the last real token, normalised, plus the weighted reward functions;
                    EOS / length penalties
    3. old/ref/V    policy, reference and value passes, same temperature, dropout off (pitfall 6)
    4. rewards      per token -beta * KL(policy || reference), the score added at the last token
    5. advantages   the estimator's (lowmem_rlhf/estimators.py): GAE with the critic, or group /
                    leave-one-out / greedy / whole-batch baselines
    6. PPO epochs   clipped policy loss (+ clipped value loss, entropy, PPO-ptx) over minibatches

Dropout is switched off in the whole model for RL (as TRL does): then the first minibatch of every
iteration sees exactly the rollout's log-probs, ratio 1 and approx-KL 0. The first PPO epoch visits
the rollout in its own order, in the same micro-batches the old log-probs were computed in, so the
equality is exact, not approximate; later epochs shuffle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from lowmem_rlhf import distributed
from lowmem_rlhf.config import PPOConfig
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.data.preference import pad_sequences
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATORS, AdvantageInputs
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.forward import hidden_states, output_head
from lowmem_rlhf.model.scoring import sequence_scores
from lowmem_rlhf.ops import (
    chunked_logprobs,
    chunked_logprobs_entropy,
    explained_variance,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from lowmem_rlhf.ops.preference import pearson
from lowmem_rlhf.rewards import RewardFunction, score_samples
from lowmem_rlhf.rollout.generate import DecodeConfig, SamplingConfig, generate, stop_token_ids
from lowmem_rlhf.train.io import strict_dumps
from lowmem_rlhf.train.losses import sft_loss_sum
from lowmem_rlhf.train.runner import LoopRunner
from lowmem_rlhf.train.usage import peak_memory

logger = logging.getLogger(__name__)


class Rollout(NamedTuple):
    """One iteration's experience. b sequences; p prompt width (left padded); t response width (right padded).

    input_ids, attention_mask: (b, p + t) prompt then response; response_mask: (b, t) True on generated
    tokens up to and including EOS; logprobs, ref_logprobs: (b, t) fp32 at the sampling temperature;
    values: (b, t) or None without a critic; raw_scores: (b,) reward-model scores, or None without a
    reward model; scores: (b,) the normalised RM score + the weighted reward functions, penalised: the
    scores used; kl: (b, t) per-token KL estimate used in the reward; advantages: (b, t); returns:
    (b, t) or None without a critic; reward_fns / judges: {name: b scores, None where it does not apply}.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    raw_scores: torch.Tensor | None
    scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    prompt_index: list[int]
    response_ids: list[list[int]]
    reward_fns: dict[str, list[float | None]] | None = None
    judges: dict[str, list[float | None]] | None = None


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def response_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
    chunk_size: int,
    value_head: nn.Module | None = None,
    need_logprobs: bool = True,
    entropy: Literal["none", "logged", "trained"] = "none",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(log-probs, values, entropies) of the response tokens, each (b, t); position p-1+i predicts token i.

    entropy: "none" skips it; "logged" computes the per-token entropy of the policy without a graph;
    "trained" with one, for an entropy bonus.
    """
    hidden = hidden_states(model, input_ids, attention_mask)
    t = input_ids.shape[1] - prompt_width
    h = hidden[:, prompt_width - 1 : prompt_width - 1 + t]
    logprobs = entropies = None
    if need_logprobs:
        head = output_head(model)
        targets = input_ids[:, prompt_width:]
        if entropy == "none":
            logprobs = chunked_logprobs(h, head, targets, chunk_size, temperature)
        else:
            logprobs, entropies = chunked_logprobs_entropy(
                h, head, targets, chunk_size, temperature, entropy_grad=entropy == "trained"
            )
    values = value_head(h) if value_head is not None else None
    return logprobs, values, entropies


class DivergenceWatch:
    """Warns once each when RL drifts: KL far above its target, or the EOS rate collapsing.

    KL: the mean per-response KL to the reference above KL_ALARM x target_kl (whether or not the
    adaptive controller is on). EOS: the share of responses ending with EOS below half of the first
    iteration's (when that was at least 20%): responses are running into max_new_tokens.
    """

    KL_ALARM = 3.0

    def __init__(self, pc: PPOConfig, eos_rate_start: float | None = None):
        self.pc, self.eos_rate_start, self.warned = pc, eos_rate_start, set()

    def check(self, step: int, m: dict[str, float]) -> list[str]:
        pc, lines = self.pc, []
        if self.eos_rate_start is None:
            self.eos_rate_start = m["eos_rate"]
        if "kl" not in self.warned and m["kl"] > self.KL_ALARM * pc.target_kl:
            self.warned.add("kl")
            lines.append(
                f"ppo iteration {step}: the KL to the reference is {m['kl']:.1f} nats per response, over "
                f"{self.KL_ALARM:g}x ppo.target_kl ({pc.target_kl:g}): the policy is drifting far from SFT; raise "
                f"ppo.kl_coef (now {m['kl_coef']:.3g}), set ppo.adaptive_kl: true, or lower ppo.learning_rate"
            )
        start = self.eos_rate_start
        if "eos" not in self.warned and start >= 0.2 and m["eos_rate"] < 0.5 * start:
            self.warned.add("eos")
            lines.append(
                f"ppo iteration {step}: only {m['eos_rate']:.0%} of responses end with EOS ({start:.0%} at the "
                "start): they are running into ppo.max_new_tokens; set ppo.missing_eos_penalty, raise ppo.kl_coef, "
                "or lower ppo.learning_rate"
            )
        return lines


class PPOTrainer(LoopRunner):
    """Runs `pc.num_steps` iterations of rollout + update on the roles of `bank`, on the one loop runner.

    Scores come from the `reward` role (unless `pc.reward_model` is false) plus `reward_fns` weighted by
    `pc.reward_weights`; `judges` only score (logged under their names). Both get `prompt_columns`, the
    prompt rows' other columns; `prompt_source` names the prompt file in their error messages.
    """

    unit = "it"
    lower = "rollout_batch_size or micro_batch_size (or max_new_tokens)"
    step_files = ("samples.jsonl",)

    def __init__(
        self,
        *,
        bank: AdapterBank,
        pc: PPOConfig,
        stage_dir: Path,
        prompts: list[list[int]],
        prompt_texts: list[str],
        tokenizer,
        seed: int,
        settings: dict,
        reward_stats: dict | None,
        chunk_size: int,
        judges: list[RewardFunction] = (),
        ptx_batches: Callable[[int], dict] | None = None,
        reward_fns: list[RewardFunction] = (),
        prompt_columns: dict[str, list] | None = None,
        prompt_source: str = "prompts",
    ):
        self.pc, self.desc = pc, f"ppo ({pc.advantage})"
        self.prompts, self.prompt_texts, self.tok = prompts, prompt_texts, tokenizer
        self.seed, self.chunk, self.judges, self.ptx_batches = seed, chunk_size, list(judges), ptx_batches
        self.reward_fns, self.reward_weights = list(reward_fns), pc.reward_weights or [1.0] * len(reward_fns)
        self.columns, self.source = prompt_columns or {}, prompt_source
        self.reward_stats = reward_stats if pc.normalize_reward else None
        self.estimator = ESTIMATORS[pc.advantage]
        self.critic = self.estimator.critic
        self.value_role = ("value" if pc.critic == "separate" else "policy") if self.critic else None
        self.train_roles = ["policy"] + (["value"] if self.value_role == "value" else [])
        bank.disable_dropout()
        self.samples_per_prompt = self.estimator.samples_per_prompt(pc.group_size)
        self.rollout_size = pc.rollout_batch_size * self.samples_per_prompt
        updates = pc.num_steps * pc.ppo_epochs * math.ceil(self.rollout_size / pc.mini_batch_size)
        super().__init__(
            name="ppo",
            bank=bank,
            cfg=pc,
            stage_dir=stage_dir,
            total_steps=pc.num_steps,
            scheduler_steps=updates,
            roles=self.train_roles,
            settings=settings,
            seed=seed,
        )
        # this process's sizes: rollout_batch_size prompts (whole groups), mini- and micro-batches split N ways
        self.lpc = distributed.per_device_section("ppo", pc, self.dist.world)
        self.kl_ctl = AdaptiveKLController(pc.kl_coef, pc.target_kl if pc.adaptive_kl else None, pc.kl_horizon)
        self.sampling = SamplingConfig(pc.max_new_tokens, pc.temperature, pc.top_p, pc.top_k)
        self.decode = DecodeConfig(
            batch_size=self.lpc.generation_batch_size,
            cache=pc.generation_cache,
            prompt_width=pc.max_prompt_length if pc.generation_cache == "static" else None,
            compile=pc.compile_generation,
        )
        self.eos_ids = end_of_turn_ids(tokenizer)
        self.stop_ids = set(stop_token_ids(bank, self.eos_ids))
        self.last_rollout: Rollout | None = None
        self.global_rollout: Rollout | None = None  # under N processes: every process's rollout, gathered
        self.watch = DivergenceWatch(pc)

    # ------------------------------------------------------------------ 1-5: experience

    def prompt_indices(self, step: int) -> list[int]:
        """The prompts of iteration `step`: consecutive slices of a per-epoch permutation (resumable)."""
        n, b = len(self.prompts), self.pc.rollout_batch_size
        out = []
        for k in range(step * b, (step + 1) * b):
            epoch, pos = divmod(k, n)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            out.append(torch.randperm(n, generator=g)[pos].item())
        return out

    def _scores(
        self, raw: torch.Tensor | None, fn_total: torch.Tensor | None, response_mask: torch.Tensor, ended: torch.Tensor
    ) -> torch.Tensor:
        """RM score (normalised) + Σ w_i f_i, minus the EOS and length penalties: (b,)."""
        pc = self.pc
        s = torch.zeros(len(response_mask), device=response_mask.device) if raw is None else raw
        if raw is not None and self.reward_stats is not None:
            s = (s - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-8)
        if fn_total is not None:
            s = s + fn_total
        s = s - pc.missing_eos_penalty * (~ended).float() - pc.length_penalty * response_mask.sum(1).float()
        return s

    def _call_fns(self, fns: list[RewardFunction], index: list[int], response_ids: list[list[int]]) -> dict:
        """{name: one score or None per sample} of `fns` on these responses (decoded as in samples.jsonl)."""
        texts = [self.tok.decode(r, skip_special_tokens=True).strip() for r in response_ids]
        error, scores = None, {}
        try:
            scores = score_samples(fns, self.prompt_texts, self.columns, index, texts, response_ids, self.source)
        except UserError as e:  # a function failed in this process: every process stops here together
            error = e
        distributed.agree_sum([], error)
        return scores

    def _fn_total(self, per_fn: dict[str, list[float | None]], device) -> torch.Tensor | None:
        """Σ_i w_i f_i per sample, None counting 0; None without reward functions."""
        if not per_fn:
            return None
        total = torch.zeros(len(next(iter(per_fn.values()))), dtype=torch.float64)
        for w, scores in zip(self.reward_weights, per_fn.values(), strict=True):
            total += w * torch.tensor([0.0 if v is None else v for v in scores], dtype=torch.float64)
        return total.float().to(device)

    @torch.no_grad()
    def _score_raw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        if not self.pc.reward_model:
            return None
        out, mb = [], self.lpc.micro_batch_size
        with self.bank.use("reward") as m:
            for i in range(0, len(input_ids), mb):
                out.append(
                    sequence_scores(m, self.bank.head("reward"), input_ids[i : i + mb], attention_mask[i : i + mb])
                )
        return torch.cat(out).float()

    @torch.no_grad()
    def _pass(self, role: str, ids, mask, p: int, value_head=None, need_logprobs=True):
        """Log-probs and/or values of every rollout row, micro-batch by micro-batch in rollout order."""
        logps, vals, mb = [], [], self.lpc.micro_batch_size
        with self.bank.use(role) as m:
            for i in range(0, len(ids), mb):
                lp, v, _ = response_forward(
                    m, ids[i : i + mb], mask[i : i + mb], p, self.pc.temperature, self.chunk, value_head, need_logprobs
                )
                logps.append(lp)
                vals.append(v)
        return (torch.cat(logps) if need_logprobs else None), (torch.cat(vals) if value_head is not None else None)

    def _batch(self, prompts: list[list[int]], responses: list[list[int]]):
        device = self.bank.device
        q_ids, q_mask = pad_sequences(prompts, self.tok.pad_token_id, "left")
        r_ids, r_mask = pad_sequences([r or [self.tok.eos_token_id] for r in responses], self.tok.pad_token_id)
        r_mask &= torch.tensor([bool(r) for r in responses])[:, None]
        ids = torch.cat([q_ids, r_ids], 1).to(device)
        mask = torch.cat([q_mask, r_mask], 1).to(device)
        return ids, mask, r_mask.to(device), q_ids.shape[1]

    def _greedy_scores(self, prompts: list[list[int]], index: list[int], device) -> torch.Tensor:
        """Scores of the policy's greedy responses to `prompts` (ReMax's baseline): (b,)."""
        greedy = generate(
            self.bank,
            "policy",
            prompts,
            SamplingConfig(self.pc.max_new_tokens, 0.0),
            self.eos_ids,
            self.tok.pad_token_id,
            decode=self.decode,
        )
        g_ids, g_mask, g_rmask, _ = self._batch(prompts, greedy.response_ids)
        g_fn = self._fn_total(self._call_fns(self.reward_fns, index, greedy.response_ids), device)
        return self._scores(self._score_raw(g_ids, g_mask), g_fn, g_rmask, torch.tensor(greedy.ended, device=device))

    def rollout(self, step: int) -> Rollout:
        pc = self.pc
        chosen = self.prompt_indices(step)
        if self.dist.enabled:  # this process's share of the prompts; a prompt's samples stay together
            a, b = distributed.share(len(chosen))
            chosen = chosen[a:b]
        index = [i for i in chosen for _ in range(self.samples_per_prompt)]
        prompts = [self.prompts[i] for i in index]
        # 1. generate trajectories (eval mode, KV cache, stop at EOS)
        gen = generate(
            self.bank, "policy", prompts, self.sampling, self.eos_ids, self.tok.pad_token_id, decode=self.decode
        )
        ids, mask, rmask, p = self._batch(prompts, gen.response_ids)
        ended = torch.tensor(gen.ended, device=ids.device)
        # 2. rewards from the reward role at the last real token, plus the reward functions
        raw = self._score_raw(ids, mask)
        fn_scores = self._call_fns(self.reward_fns, index, gen.response_ids)
        scores = self._scores(raw, self._fn_total(fn_scores, ids.device), rmask, ended)
        judged = self._call_fns(self.judges, index, gen.response_ids)
        # 3. old log-probs (+ shared values), reference log-probs, values
        shared_head = self.bank.head("policy") if self.value_role == "policy" else None
        logprobs, values = self._pass("policy", ids, mask, p, shared_head)
        ref_logprobs, _ = self._pass("reference", ids, mask, p)
        if self.value_role == "value":
            _, values = self._pass("value", ids, mask, p, self.bank.head("value"), need_logprobs=False)
        # 4. per-token KL(policy || reference): the same tensor is logged and used
        kl = torch.where(rmask, kl_penalty(logprobs, ref_logprobs, pc.kl_estimator), 0.0)
        # 5. advantages (the estimator's own baseline: critic values, group, greedy response, batch)
        baseline = self._greedy_scores(prompts, index, ids.device) if self.estimator.greedy_baseline else None
        inputs = AdvantageInputs(scores, kl, self.kl_ctl.value, rmask, values, baseline)
        if self.dist.enabled:
            advantages, returns = self._global_advantages(inputs, raw, index, gen.response_ids, fn_scores, judged)
        else:
            advantages, returns = self.estimator.advantages(inputs, pc)
            self.global_rollout = None
        return Rollout(
            ids,
            mask,
            rmask,
            p,
            logprobs,
            ref_logprobs,
            values,
            raw,
            scores,
            kl,
            advantages,
            returns,
            index,
            gen.response_ids,
            fn_scores,
            judged,
        )

    def _global_advantages(self, x: AdvantageInputs, raw, index, response_ids, fn_scores, judged):
        """Under N processes: gather every process's rollout, compute the advantages on the whole of it
        (whitening and batch baselines see what one process would) and keep this process's rows.

        The gathered rollout (CPU, no token ids) is kept in `global_rollout` for the metrics and samples.
        """
        local = {
            "scores": x.scores.cpu(),
            "kl": x.kl.cpu(),
            "mask": x.mask.cpu(),
            "values": None if x.values is None else x.values.cpu(),
            "baseline": None if x.baseline_scores is None else x.baseline_scores.cpu(),
            "raw": None if raw is None else raw.cpu(),
            "index": index,
            "response_ids": response_ids,
            "fn_scores": fn_scores,
            "judged": judged,
        }
        parts = distributed.all_gather_object(local)
        width = max(p["kl"].shape[1] for p in parts)

        def cat(key: str):
            if parts[0][key] is None:
                return None
            ts = [p[key] for p in parts]
            if ts[0].dim() == 2:  # right-pad each process's (b, t) to the widest response (0 / False: not valid)
                ts = [torch.cat([t, t.new_zeros(len(t), width - t.shape[1])], 1) for t in ts]
            return torch.cat(ts)

        def join(key: str):
            return {name: [v for p in parts for v in p[key][name]] for name in parts[0][key]}

        g = {k: cat(k) for k in ("scores", "kl", "mask", "values", "baseline", "raw")}
        advantages, returns = self.estimator.advantages(
            AdvantageInputs(g["scores"], g["kl"], x.kl_coef, g["mask"], g["values"], g["baseline"]), self.pc
        )
        self.global_rollout = Rollout(
            None,
            None,
            g["mask"],
            0,
            None,
            None,
            g["values"],
            g["raw"],
            g["scores"],
            g["kl"],
            advantages,
            returns,
            [i for p in parts for i in p["index"]],
            [r for p in parts for r in p["response_ids"]],
            join("fn_scores"),
            join("judged"),
        )
        start = sum(len(p["index"]) for p in parts[: self.dist.rank])
        rows, t, device = slice(start, start + len(index)), x.kl.shape[1], x.kl.device
        return advantages[rows, :t].to(device), None if returns is None else returns[rows, :t].to(device)

    # ------------------------------------------------------------------ 6: PPO epochs

    def update(self, ro: Rollout, step: int) -> dict[str, float]:
        pc, lpc, n = self.pc, self.lpc, len(ro.input_ids)
        n_minibatches = math.ceil(n / lpc.mini_batch_size)
        sums: dict[str, float] = {}
        count = 0
        first_dev = 0.0
        for epoch in range(pc.ppo_epochs):
            order = torch.arange(n) if epoch == 0 else torch.randperm(n)
            for mb_start in range(0, n, lpc.mini_batch_size):
                mb = order[mb_start : mb_start + lpc.mini_batch_size]
                mb_tokens = ro.response_mask[mb].sum()
                if self.dist.enabled:  # each token's weight is 1 / the tokens of the global minibatch
                    mb_tokens = mb_tokens.new_tensor(distributed.all_reduce_sum([float(mb_tokens)])[0])
                mb_tokens = mb_tokens.clamp(min=1)
                losses = []
                for mi in range(0, len(mb), lpc.micro_batch_size):
                    idx = mb[mi : mi + lpc.micro_batch_size]
                    stats = self._micro_step(ro, idx, float(ro.response_mask[idx].sum() / mb_tokens))
                    if epoch == 0 and mb_start == 0:
                        first_dev = max(first_dev, stats.pop("max_logratio"))
                    else:
                        stats.pop("max_logratio")
                    losses += [stats["pg_loss"], stats.get("value_loss", 0.0)]
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                if self.ptx_batches is not None and pc.ptx_coef > 0:
                    k = (step * pc.ppo_epochs + epoch) * n_minibatches + mb_start // lpc.mini_batch_size
                    losses.append(self._ptx_step(k))
                    sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + losses[-1] * (len(mb) / lpc.micro_batch_size)
                norm = self.optimizer_step(all(math.isfinite(v) for v in losses))
                if pc.max_grad_norm > 0:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm * (len(mb) / lpc.micro_batch_size)
                if self.skips_in_a_row >= pc.max_consecutive_skips:
                    break  # the run stops after logging this iteration
            if self.skips_in_a_row >= pc.max_consecutive_skips:
                break
        metrics = {k: v / count for k, v in sums.items()}
        if self.dist.enabled:  # the mean over processes (each ran the same number of micro-steps)
            keys = sorted(metrics)
            total = distributed.all_reduce_sum([metrics[k] for k in keys])
            metrics = {k: v / self.dist.world for k, v in zip(keys, total, strict=True)}
            first_dev = distributed.all_reduce_max([first_dev])[0]
        metrics["first_minibatch_max_logratio"] = first_dev
        metrics["skipped_steps"] = self.skipped_steps
        return metrics

    def _micro_step(self, ro: Rollout, idx: torch.Tensor, weight: float) -> dict[str, float]:
        pc = self.pc
        ids, mask, rmask = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx]
        shared_head = self.bank.head("policy") if self.value_role == "policy" else None
        with self.bank.use("policy", train=True) as m:
            logp, values, token_entropy = response_forward(
                m,
                ids,
                mask,
                ro.prompt_width,
                pc.temperature,
                self.chunk,
                shared_head,
                entropy="trained" if pc.entropy_coef else "logged",
            )
            pg_loss, pg = ppo_policy_loss(logp, ro.logprobs[idx], ro.advantages[idx], rmask, pc.clip_range)
            # the mean over response tokens of the whole next-token distribution's entropy (not the sampled
            # token's -log p, whose expected gradient on-policy is zero)
            entropy = masked_mean(token_entropy, rmask)
            loss = pg_loss
            if pc.entropy_coef:
                loss = loss - pc.entropy_coef * entropy
            stats = {
                "pg_loss": pg_loss.item(),
                "clipfrac": float(pg["clipfrac"]),
                "approx_kl": float(pg["approx_kl"]),
                "entropy": float(entropy.detach()),
                "max_logratio": float(torch.where(rmask, (logp.detach() - ro.logprobs[idx]).abs(), 0).max()),
            }
            if self.value_role == "policy":
                v_loss, vs = ppo_value_loss(values, ro.values[idx], ro.returns[idx], rmask, pc.clip_range_value)
                loss = loss + pc.vf_coef * v_loss
                stats.update(value_loss=v_loss.item(), value_clipfrac=float(vs["value_clipfrac"]))
            (loss * weight).backward()
        if self.value_role == "value":
            with self.bank.use("value", train=True) as m:
                _, values, _ = response_forward(
                    m,
                    ids,
                    mask,
                    ro.prompt_width,
                    pc.temperature,
                    self.chunk,
                    self.bank.head("value"),
                    need_logprobs=False,
                )
                v_loss, vs = ppo_value_loss(values, ro.values[idx], ro.returns[idx], rmask, pc.clip_range_value)
                (pc.vf_coef * v_loss * weight).backward()
            stats.update(value_loss=v_loss.item(), value_clipfrac=float(vs["value_clipfrac"]))
        return stats

    def _ptx_step(self, k: int) -> float:
        """PPO-ptx: the SFT loss of the k-th SFT batch, scaled by ptx_coef, added to this minibatch's gradient.

        Under N processes `ptx_batches` gives this process's 1/N of the batch's rows; the sum of the
        processes' gradients is then the whole batch's.
        """
        batch = {key: v.to(self.bank.device) for key, v in self.ptx_batches(k).items()}
        tokens = batch["response_mask"][:, 1:].sum()
        if self.dist.enabled:  # this process holds its share of the batch's rows; the mean is over all its tokens
            tokens = tokens.new_tensor(distributed.all_reduce_sum([float(tokens)])[0])
        tokens = tokens.clamp(min=1)
        with self.bank.use("policy", train=True) as m:
            loss_sum, _ = sft_loss_sum(m, batch, self.chunk)
            loss = loss_sum / tokens
            (self.pc.ptx_coef * loss).backward()
        # this process's part of the batch's mean loss; x N, so the mean over processes is the whole batch's
        return loss.item() * self.dist.world

    # ------------------------------------------------------------------ logging and the loop

    def rollout_metrics(self, ro: Rollout) -> dict[str, float]:
        lengths = ro.response_mask.sum(1).float()
        kl_seq = ro.kl.sum(1)
        m = {
            "reward": float(ro.scores.mean()),
            "kl": float(kl_seq.mean()),
            "kl_coef": self.kl_ctl.value,
            "response_length": float(lengths.mean()),
            "eos_rate": float(
                torch.tensor([bool(r) and r[-1] in self.stop_ids for r in ro.response_ids]).float().mean()
            ),
            "reward_length_corr": float(pearson(self._unpenalised(ro).cpu(), lengths.cpu())),
            "advantage_std": float(masked_mean(ro.advantages.square(), ro.response_mask).sqrt()),
        }
        if ro.raw_scores is not None:
            m["reward_raw"] = float(ro.raw_scores.mean())
        if ro.values is not None:
            m["explained_variance"] = float(explained_variance(ro.values, ro.returns, ro.response_mask))
        for name, scores in (ro.reward_fns or {}).items():
            applied = torch.tensor([v for v in scores if v is not None], dtype=torch.float64)
            m[f"reward/{name}/mean"] = float(applied.mean()) if len(applied) else float("nan")
            m[f"reward/{name}/std"] = float(applied.std(correction=0)) if len(applied) else float("nan")
            m[f"reward/{name}/none"] = len(scores) - len(applied)
        for name, scores in (ro.judges or {}).items():
            applied = [v for v in scores if v is not None]
            if applied:
                m[name] = sum(applied) / len(applied)
        return m

    def _unpenalised(self, ro: Rollout) -> torch.Tensor:
        """The raw RM score, or without a reward model the weighted sum of the reward functions: (b,)."""
        if ro.raw_scores is not None:
            return ro.raw_scores
        return self._fn_total(ro.reward_fns, ro.scores.device)

    def _texts(self, ro: Rollout) -> list[tuple[str, str]]:
        return [
            (self.prompt_texts[i], self.tok.decode(r, skip_special_tokens=True).strip())
            for i, r in zip(ro.prompt_index, ro.response_ids, strict=True)
        ]

    def _log_samples(self, step: int, ro: Rollout, n: int = 8) -> None:
        """The first n samples: RM `reward` (raw), each reward function's score, the `score` used, judges."""
        rows = []
        for j, (p, r) in enumerate(self._texts(ro)[:n]):
            row = {"step": step, "prompt": p, "response": r}
            if ro.raw_scores is not None:
                row["reward"] = float(ro.raw_scores[j])
            if ro.reward_fns:
                row["reward_funcs"] = {name: scores[j] for name, scores in ro.reward_fns.items()}
            row["score"] = float(ro.scores[j])
            row.update({name: scores[j] for name, scores in (ro.judges or {}).items()})
            rows.append(strict_dumps(row, ensure_ascii=False))
        with (self.stage_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")

    # ------------------------------------------------------------------ the runner's hooks

    def _step(self, step: int) -> dict[str, float]:
        """One iteration: rollout (1-5), then the PPO epochs (6); the KL controller sees the rollout's KL."""
        ro = self.rollout(step)
        # under N processes the metrics and samples are those of every process's rollout together
        whole = ro if self.global_rollout is None else self.global_rollout
        self.last_rollout = whole
        metrics = self.rollout_metrics(whole)
        metrics.update(self.update(ro, step))
        self.kl_ctl.update(metrics["kl"], len(whole.response_ids))
        return metrics

    def after_step(self, step: int, metrics: dict[str, float], at_end: bool) -> None:
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["elapsed_s"] = self.clock.elapsed()
        metrics.update(peak_memory(self.bank.device))
        for line in self.watch.check(step, metrics):
            logger.warning("%s", line)

    def postfix(self, metrics: dict[str, float]) -> dict:
        return {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics['kl']:.3f}", "skipped": self.skipped_steps}

    def summary(self, metrics: dict[str, float]) -> str:
        shown = (
            "reward_raw",
            "gold",
            "kl",
            "kl_coef",
            "response_length",
            "eos_rate",
            "clipfrac",
            "value_loss",
            "explained_variance",
        )
        return ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)

    def after_log(self, step: int, at_end: bool) -> None:
        if self.dist.is_main and (step % self.pc.sample_log_steps == 0 or at_end):
            self._log_samples(step, self.last_rollout)

    def extra_state(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, "eos_rate_start": self.watch.eos_rate_start}

    def load_extra_state(self, extra: dict) -> None:
        self.kl_ctl.value = extra["kl_coef"]
        self.watch.eos_rate_start = extra.get("eos_rate_start")
