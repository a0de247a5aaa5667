"""Progress of a long phase: a tqdm bar on a terminal, otherwise a log line with the count now and then.

tqdm turns itself off when stderr is not a terminal (CI logs, `> run.log 2>&1`), which left a phase of
minutes silent there; `Progress` logs `desc done/total unit (N s)` instead: when the phase starts, at
most every `interval_s` seconds, and when it ends. Only the main process of a data-parallel run reports.
"""

from __future__ import annotations

import logging
import sys
from time import monotonic

from lowmem_rlhf import distributed

INTERVAL_S = 30.0

_logger = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """`with Progress("rm: reward statistics", len(seqs), "responses", logger) as p: ... p.update(len(batch))`."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        logger: logging.Logger | None = None,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.logger = logger or _logger
        self.done, self.logged = 0, -1
        self.bar = None
        self.quiet = not distributed.is_main()

    def __enter__(self) -> Progress:
        self.start = self.last = monotonic()
        if self.quiet:
            return self
        if stderr_is_terminal():
            from tqdm.auto import tqdm

            # leave=None: the bar stays on screen unless it is nested under another (the training loop's)
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=None, dynamic_ncols=True)
        else:
            self._log()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and monotonic() - self.last >= self.interval_s:
            self._log()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet and exc_type is None and self.logged != self.done:
            self._log()

    def _log(self) -> None:
        self.last = monotonic()
        self.logged = self.done
        elapsed = self.last - self.start
        # stacklevel: the record names the line of the phase that reports, not this one
        self.logger.info("%s %d/%d %s (%.0f s)", self.desc, self.done, self.total, self.unit, elapsed, stacklevel=3)
