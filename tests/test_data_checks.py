"""Data checks: identical pairs dropped and counted, a byte-order mark accepted, an offline Hub fails fast."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.preference import expand_rows, load_pair_examples, normalize_preference_row
from lowmem_rlhf.errors import UserError


def test_identical_chosen_and_rejected_are_dropped_and_the_row_keeps_its_weight():
    # a ranking with a duplicated response: of its 3 pairs, (a, a) teaches nothing
    pairs = normalize_preference_row({"prompt": "p", "responses": ["a", "a", "b"]}, "f, row 1")
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "b")]
    assert [p.weight for p in pairs] == pytest.approx([0.5, 0.5])  # the prompt still counts once
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
        {"prompt": "r", "responses": ["a", "a", "b"]},
    ]
    pairs, tied, identical = expand_rows(rows, "f")
    assert (len(pairs), tied, identical) == (3, 0, [1, 3])
    assert sum(p.weight for p in pairs) == pytest.approx(2.0)


def test_identical_pairs_are_warned_about_with_their_rows(tmp_path, tiny_path, caplog):
    from lowmem_rlhf.model.loading import load_tokenizer

    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] + [
        {"prompt": f"q{i}", "chosen": "z", "rejected": "z"} for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        examples = load_pair_examples(str(data), "train", load_tokenizer(ModelConfig()), 64, None, "rm")
    assert len(examples) == 1
    assert (
        f"{data}: 6 rows had a chosen response identical to the rejected one (rows 2, 3, 4, 5, 6, ...)" in caplog.text
    )


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    data = tmp_path / "rows.csv"
    data.write_bytes("\ufeffprompt,completion\nhi,there\n".encode())
    assert load_rows(str(data))[0] == [{"prompt": "hi", "completion": "there"}]


def test_hub_dataset_while_offline_fails_in_seconds_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    code = "from lowmem_rlhf.data.formats import load_rows; load_rows('someone/some-data')"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30  # without the check: ~25 s of retries on a machine without network
    assert proc.stderr.strip().splitlines()[-1] == (
        "lowmem_rlhf.errors.UserError: data 'someone/some-data' (split 'train') is not a local file and not in the "
        "local Hub cache, and HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set; give a local file, or run once online "
        "to cache it"
    )


def test_unreachable_hub_is_found_in_well_under_a_second(monkeypatch):
    from lowmem_rlhf.data.hub import check_model_source, hub_unreachable

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    start = time.monotonic()
    assert hub_unreachable() == "cannot reach http://127.0.0.1:9 (Connection refused)"
    with pytest.raises(UserError, match="is not a local file and the Hub cannot be reached"):
        load_rows("someone/some-data")
    with pytest.raises(UserError, match="'someone/some-model' is not a local folder and the Hub cannot be reached"):
        check_model_source("someone/some-model")
    assert time.monotonic() - start < 2
    check_model_source("builtin:tiny")  # local models need no Hub
