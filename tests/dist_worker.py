"""One process of the data-parallel tests: the `lowmem-rlhf` CLI plus test-only switches (environment).

DIST_TEST_SAMPLER=1   sample each response from its own seed (prompt, its place in the call, the call's
                      number), so a rollout does not depend on how the prompts are split between processes
                      and a 2-process RL run can be compared with a 1-process one.
DIST_TEST_INTERRUPT_AT=k   Ctrl-C (KeyboardInterrupt) in every process at supervised step k.
DIST_TEST_FAIL=r:k    a UserError in process r alone at supervised step k.
"""

from __future__ import annotations

import os
import sys
import zlib

import lowmem_rlhf  # noqa: F401
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.train import ppo as ppo_train
from lowmem_rlhf.train.loop import TrainLoop


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


def fault_at(step: int, exc: BaseException):
    real = TrainLoop._step

    def _step(self, s):
        if s == step:
            raise exc
        return real(self, s)

    TrainLoop._step = _step


if __name__ == "__main__":
    if os.environ.get("DIST_TEST_SAMPLER"):
        per_row_sampler()
    if os.environ.get("DIST_TEST_INTERRUPT_AT"):
        fault_at(int(os.environ["DIST_TEST_INTERRUPT_AT"]), KeyboardInterrupt())
    if os.environ.get("DIST_TEST_FAIL"):
        rank, step = os.environ["DIST_TEST_FAIL"].split(":")
        if os.environ.get("RANK", "0") == rank:
            fault_at(int(step), UserError(f"a reward function failed in process {rank} (test)"))
    from lowmem_rlhf.cli import main

    raise SystemExit(main(sys.argv[1:]))
