"""One process of the data-parallel tests: the `lowmem-rlhf` CLI plus test-only switches (environment).

DIST_TEST_SAMPLER=1   sample each response from its own seed (prompt, its place in the call, the call's
                      number), so a rollout does not depend on how the prompts are split between processes
                      and a 2-process RL run can be compared with a 1-process one.
DIST_TEST_INTERRUPT_AT=k   SIGTERM (what a launcher sends on Ctrl-C) to every process at supervised step k.
DIST_TEST_FAIL=r:k    a data error (UserError) in process r alone, building supervised step k's batches.
DIST_TEST_NAN_PPO=r:k a NaN policy loss (finite gradients) in process r alone at PPO iteration k.
DIST_TEST_HIDE_CHECKPOINTS=r   process r sees no checkpoints (a node without the shared filesystem).
"""

from __future__ import annotations

import os
import signal
import sys
import zlib

import lowmem_rlhf  # noqa: F401
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.train import ppo as ppo_train
from lowmem_rlhf.train.checkpoint import Checkpointer
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.ppo import PPOTrainer


def per_row_sampler():
    real = ppo_train.generate
    calls = [0]

    def generate(bank, role, prompts, sampling, eos_ids, pad_id, generator_seed=None, decode=None):
        calls[0] += 1
        seen: dict[tuple, int] = {}
        out = None
        for p in prompts:
            k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
            seed = zlib.crc32(repr((tuple(p), k, calls[0])).encode())
            g = real(bank, role, [p], sampling, eos_ids, pad_id, generator_seed=seed, decode=decode)
            if out is None:
                out = g
            else:
                out.prompt_ids += g.prompt_ids
                out.response_ids += g.response_ids
                out.ended += g.ended
        return out

    ppo_train.generate = generate


def sigterm_at(step: int):
    real = TrainLoop._step

    def _step(self, s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, s)

    TrainLoop._step = _step


def data_error_at(step: int, exc: BaseException):
    real = TrainLoop.micro_batch

    def micro_batch(self, m):
        if m // self.cfg.gradient_accumulation_steps == step:
            raise exc
        return real(self, m)

    TrainLoop.micro_batch = micro_batch


def nan_policy_loss_at(step: int):
    real = PPOTrainer.update

    def update(self, ro, s):
        if s != step:
            return real(self, ro, s)
        micro = self._micro_step

        def nan_micro_step(ro, idx, weight):
            return {**micro(ro, idx, weight), "pg_loss": float("nan")}

        self._micro_step = nan_micro_step
        try:
            return real(self, ro, s)
        finally:
            del self._micro_step

    PPOTrainer.update = update


def hide_checkpoints():
    Checkpointer.latest = lambda self: None


if __name__ == "__main__":
    if os.environ.get("DIST_TEST_SAMPLER"):
        per_row_sampler()
    rank = os.environ.get("RANK", "0")
    if os.environ.get("DIST_TEST_INTERRUPT_AT"):
        sigterm_at(int(os.environ["DIST_TEST_INTERRUPT_AT"]))
    if os.environ.get("DIST_TEST_FAIL", "").startswith(rank + ":"):
        data_error_at(
            int(os.environ["DIST_TEST_FAIL"].split(":")[1]), UserError(f"a data row failed in process {rank} (test)")
        )
    if os.environ.get("DIST_TEST_NAN_PPO", "").startswith(rank + ":"):
        nan_policy_loss_at(int(os.environ["DIST_TEST_NAN_PPO"].split(":")[1]))
    if os.environ.get("DIST_TEST_HIDE_CHECKPOINTS") == rank:
        hide_checkpoints()
    from lowmem_rlhf.cli import main

    raise SystemExit(main(sys.argv[1:]))
