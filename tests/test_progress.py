"""Long phases are never silent: a tqdm bar on a terminal, count lines in a log, nothing on a non-main rank."""

import io
import json
import logging
import re

import pytest
from conftest import tiny_recipe

from lowmem_rlhf import distributed, progress
from lowmem_rlhf.config import config_from_dict
from lowmem_rlhf.progress import Progress
from lowmem_rlhf.stages import rm


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake clock: set `now[0]` to move time."""
    now = [100.0]
    monkeypatch.setattr(progress, "monotonic", lambda: now[0])
    return now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test"]


def test_logs_counts_at_start_every_interval_and_end_when_not_a_terminal(monkeypatch, caplog, clock):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO)
    with Progress("phase", 10, "items", logging.getLogger("test"), interval_s=30) as p:
        for t in (10, 20, 31, 45, 62, 70):  # seconds since the start at which an item is done
            clock[0] = 100.0 + t
            p.update()
        clock[0] = 100.0 + 75
        p.update(4)
    assert lines(caplog) == [
        "phase 0/10 items (0 s)",
        "phase 3/10 items (31 s)",  # the first update 30 s after the last line
        "phase 5/10 items (62 s)",
        "phase 10/10 items (75 s)",
    ]


def test_the_last_line_is_not_repeated_and_a_failed_phase_has_none(monkeypatch, caplog, clock):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    caplog.set_level(logging.INFO)
    with Progress("phase", 2, "items", logging.getLogger("test"), interval_s=30) as p:
        clock[0] += 40
        p.update(2)
    assert lines(caplog) == ["phase 0/2 items (0 s)", "phase 2/2 items (40 s)"]
    caplog.clear()
    with pytest.raises(RuntimeError), Progress("phase", 2, "items", logging.getLogger("test")) as p:
        p.update()
        raise RuntimeError("boom")
    assert lines(caplog) == ["phase 0/2 items (0 s)"]


def test_shows_a_tqdm_bar_and_logs_nothing_on_a_terminal(monkeypatch, caplog):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.set_level(logging.INFO)
    with Progress("phase", 3, "items", logging.getLogger("test")) as p:
        for _ in range(3):
            p.update()
    assert "phase" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert lines(caplog) == []


@pytest.mark.parametrize("stderr", [io.StringIO, Terminal])
def test_a_non_main_rank_reports_nothing(monkeypatch, caplog, stderr):
    stream = stderr()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(distributed, "state", lambda: distributed.Dist(rank=1, world=2))
    caplog.set_level(logging.INFO)
    with Progress("phase", 3, "items", logging.getLogger("test"), interval_s=0) as p:
        p.update(3)
    assert lines(caplog) == [] and stream.getvalue() == ""


def test_reward_statistics_report_their_count_in_a_log(tmp_path, tiny_path, monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: a CI log, output redirected to a file
    caplog.set_level(logging.INFO)
    data = tiny_recipe(tmp_path / "run")
    data["stages"] = ["rm"]
    data["rm"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "init_from": "fresh",
        "max_samples": 8,
        "max_steps": 1,
        "batch_size": 4,
        "save_steps": 0,
        "max_length": 96,
        "stats_samples": 12,
    }
    out = rm.run(config_from_dict(data))
    pattern = re.compile(r"rm: reward statistics (\d+)/(\d+) responses \(\d+ s\)")
    counts = [tuple(map(int, m.groups())) for r in caplog.records if (m := pattern.fullmatch(r.getMessage()))]
    assert counts[0] == (0, 12) and counts[-1] == (12, 12)
    assert json.loads((out / rm.STATS_FILE).read_text())["n"] == 12
