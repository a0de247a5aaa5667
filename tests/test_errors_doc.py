"""docs/errors.md's table is true: each bad input exits with status 2 and prints exactly the documented line.

Every case runs through `lowmem_rlhf.cli.main` in a fresh folder (the table's DIR); none loads a model
(loading one fails the test), so the whole table takes seconds.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import config_from_dict, dump_yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"

SFT_ROW = json.dumps({"prompt": "What is 1 plus 1?", "completion": "1 plus 1 is 2."}) + "\n"
RECIPE = "output_dir: out\nmodel:\n  device: cpu\nsft:\n  dataset: sft.jsonl\n"


def recipe(extra: str = "", sft: str = "sft.jsonl") -> str:
    return RECIPE.replace("sft.jsonl", sft) + extra


def parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a"], "completion": ["b"]}), buf)
    return buf.getvalue()


def run_folder(stages: dict, model: str = "builtin:tiny") -> dict:
    """A run folder as a finished run leaves it, without any weights: config.yaml and manifest.json."""
    cfg = dump_yaml(config_from_dict({"output_dir": "run", "model": {"device": "cpu", "name_or_path": model}}))
    return {"run/config.yaml": cfg, "run/manifest.json": json.dumps({"stages": stages})}


def prefs(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


RM = "stages: [rm]\nrm:\n  init_from: fresh\n  dataset: prefs.jsonl\n"

# bad input (the table's first column) -> (files to create, command-line arguments)
CASES: dict[str, tuple[dict[str, str | bytes], list[str]]] = {
    # the recipe file
    "recipe file missing": ({}, ["show", "missing.yaml"]),
    "recipe not valid YAML": ({"recipe.yaml": "a: 1\n b: [\n"}, ["show", "recipe.yaml"]),
    "recipe top level is a list": ({"recipe.yaml": "- sft\n"}, ["show", "recipe.yaml"]),
    "misspelt key `sft.datset`": ({"recipe.yaml": "sft:\n  datset: x.jsonl\n"}, ["show", "recipe.yaml"]),
    "unknown key, nothing close (`lora.rank=4`)": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "lora.rank=4"]),
    "wrong type (`sft.batch_size: four`)": ({"recipe.yaml": "sft:\n  batch_size: four\n"}, ["show", "recipe.yaml"]),
    "not one of the choices (`model.quantization: nf3`)": (
        {"recipe.yaml": "model:\n  quantization: nf3\n"},
        ["show", "recipe.yaml"],
    ),
    "a section given a value (`model: tiny`)": ({"recipe.yaml": "model: tiny\n"}, ["show", "recipe.yaml"]),
    "override without `=`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "lora.r"]),
    "override through a value (`sft.batch_size.x=1`)": (
        {"recipe.yaml": RECIPE},
        ["show", "recipe.yaml", "sft.batch_size.x=1"],
    ),
    "unknown stage": ({"recipe.yaml": "stages: [sft, ppx]\n"}, ["show", "recipe.yaml"]),
    "empty stage list": ({"recipe.yaml": "stages: []\n"}, ["show", "recipe.yaml"]),
    "`sft.max_length: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.max_length=0"]),
    "`lora.r: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "lora.r=0"]),
    "`lora.dropout: 1`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "lora.dropout=1"]),
    "negative learning rate": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.learning_rate=-1e-4"]),
    "NaN learning rate (`.nan`)": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "ppo.learning_rate=.nan"]),
    "`sft.warmup_ratio: 1.5`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.warmup_ratio=1.5"]),
    "negative `ppo.clip_range`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "ppo.clip_range=-0.2"]),
    "negative `ppo.clip_range_value`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "ppo.clip_range_value=-1"]),
    "`ppo.top_p: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "ppo.top_p=0"]),
    "`ppo.temperature: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "ppo.temperature=0"]),
    "`sft.save_total_limit: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.save_total_limit=0"]),
    "`sft.max_steps: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.max_steps=0"]),
    "negative `seed`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "seed=-1"]),
    "`sft.batch_size: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.batch_size=0"]),
    "unknown metrics sink": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "sft.report_to=[tensorbord]"]),
    "`dpo.beta: 0`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "dpo.beta=0"]),
    "`dpo.label_smoothing: 0.5`": ({"recipe.yaml": RECIPE}, ["show", "recipe.yaml", "dpo.label_smoothing=0.5"]),
    "grpo with `group_size: 1`": (
        {"recipe.yaml": RECIPE},
        ["show", "recipe.yaml", "ppo.advantage=grpo", "ppo.group_size=1"],
    ),
    "minibatch not a multiple of the micro-batch": (
        {"recipe.yaml": RECIPE},
        ["show", "recipe.yaml", "ppo.mini_batch_size=6", "ppo.micro_batch_size=4"],
    ),
    "compiled rollout without a static cache": (
        {"recipe.yaml": RECIPE},
        ["show", "recipe.yaml", "ppo.compile_generation=true"],
    ),
    "embeddings in host memory with a compiled rollout": (
        {"recipe.yaml": RECIPE},
        ["show", "recipe.yaml", "model.embeddings=host", "ppo.generation_cache=static", "ppo.compile_generation=true"],
    ),
    # data files and sources
    "stage listed, its dataset not set (validate)": ({"recipe.yaml": "stages: [sft]\n"}, ["validate", "recipe.yaml"]),
    "compare listed without prompts (validate)": (
        {"recipe.yaml": recipe("stages: [compare]\n"), "sft.jsonl": SFT_ROW},
        ["validate", "recipe.yaml"],
    ),
    "stage run without its dataset": ({"recipe.yaml": "output_dir: out\n"}, ["sft", "recipe.yaml"]),
    "data file missing": ({"recipe.yaml": recipe(sft="data/none.jsonl")}, ["sft", "recipe.yaml"]),
    "bundled data file missing": ({"recipe.yaml": recipe(sft="builtin:tiny/none.jsonl")}, ["sft", "recipe.yaml"]),
    "data path is a folder": ({"recipe.yaml": recipe(sft="data.jsonl"), "data.jsonl/x": ""}, ["sft", "recipe.yaml"]),
    "unsupported extension": ({"recipe.yaml": recipe(sft="sft.txt"), "sft.txt": SFT_ROW}, ["sft", "recipe.yaml"]),
    "empty data file": ({"recipe.yaml": recipe(), "sft.jsonl": "\n"}, ["sft", "recipe.yaml"]),
    "non-UTF-8 bytes": (
        {"recipe.yaml": recipe(), "sft.jsonl": SFT_ROW.encode() + b"\xff\xfe\n"},
        ["sft", "recipe.yaml"],
    ),
    "invalid JSON line": ({"recipe.yaml": recipe(), "sft.jsonl": SFT_ROW + "{prompt: x}\n"}, ["sft", "recipe.yaml"]),
    "a row that is not an object": (
        {"recipe.yaml": recipe(), "sft.jsonl": SFT_ROW + "[1, 2]\n"},
        ["sft", "recipe.yaml"],
    ),
    "row missing a field": (
        {"recipe.yaml": recipe(), "sft.jsonl": SFT_ROW + json.dumps({"prompt": "What is 2 plus 2?"}) + "\n"},
        ["sft", "recipe.yaml"],
    ),
    "Parquet file named .jsonl": ({"recipe.yaml": recipe(), "sft.jsonl": parquet_bytes()}, ["sft", "recipe.yaml"]),
    "JSON Lines named .parquet": (
        {"recipe.yaml": recipe(sft="sft.parquet"), "sft.parquet": SFT_ROW},
        ["sft", "recipe.yaml"],
    ),
    "JSON list named .jsonl": ({"recipe.yaml": recipe(), "sft.jsonl": "[" + SFT_ROW + "]"}, ["sft", "recipe.yaml"]),
    "JSON Lines named .json": (
        {"recipe.yaml": recipe(sft="sft.json"), "sft.json": SFT_ROW + SFT_ROW},
        ["sft", "recipe.yaml"],
    ),
    "JSON named .csv": ({"recipe.yaml": recipe(sft="sft.csv"), "sft.csv": SFT_ROW}, ["sft", "recipe.yaml"]),
    "Hub dataset id, Hub unreachable": ({"recipe.yaml": recipe(sft="someone/some-data")}, ["sft", "recipe.yaml"]),
    "preference row with one response": (
        {"recipe.yaml": recipe(RM), "prefs.jsonl": prefs({"prompt": "p", "responses": ["a"]})},
        ["rm", "recipe.yaml"],
    ),
    "ratings whose scores do not match the responses": (
        {"recipe.yaml": recipe(RM), "prefs.jsonl": prefs({"prompt": "p", "responses": ["a", "b"], "scores": [1]})},
        ["rm", "recipe.yaml"],
    ),
    "every pair has chosen == rejected": (
        {"recipe.yaml": recipe(RM), "prefs.jsonl": prefs({"prompt": "p", "chosen": "a", "rejected": "a"})},
        ["rm", "recipe.yaml"],
    ),
    "a later stage before its input stage": (
        {"recipe.yaml": recipe("ppo:\n  dataset: p.jsonl\n")},
        ["ppo", "recipe.yaml"],
    ),
    # the model and the output folder
    "unknown builtin model": (
        {"recipe.yaml": recipe("model:\n  name_or_path: builtin:huge\n").replace("model:\n  device: cpu\n", "")},
        ["sft", "recipe.yaml"],
    ),
    "Hub model id, Hub unreachable": (
        {"recipe.yaml": "output_dir: out\nmodel:\n  name_or_path: someone/some-model\n"},
        ["sft", "recipe.yaml"],
    ),
    "model folder missing": (
        {"recipe.yaml": "output_dir: out\nmodel:\n  name_or_path: ./models/none\n"},
        ["sft", "recipe.yaml"],
    ),
    "`output_dir` under a file": (
        {"recipe.yaml": recipe().replace("output_dir: out", "output_dir: notes.txt/out"), "notes.txt": "x"},
        ["sft", "recipe.yaml"],
    ),
    "`output_dir` not writable": (
        {"recipe.yaml": recipe().replace("output_dir: out", "output_dir: /sys/lowmem-rlhf-out")},
        ["sft", "recipe.yaml"],
    ),
    # generate and score on a run folder
    "not a run folder": ({"notes/x": ""}, ["generate", "notes", "--prompt", "hi"]),
    "`generate --stage rm`": (run_folder({"sft": {}}), ["generate", "run", "--stage", "rm", "--prompt", "hi"]),
    "`generate --stage` of a stage that did not finish": (
        run_folder({"sft": {}}),
        ["generate", "run", "--stage", "ppo", "--prompt", "hi"],
    ),
    "`generate` without prompts": (run_folder({"sft": {}}), ["generate", "run"]),
    "`generate` from a run of a Hub model, Hub unreachable": (
        run_folder({"sft": {}}, model="someone/some-model"),
        ["generate", "run", "--prompt", "hi"],
    ),
    "`score` a run without a reward model": (
        run_folder({"sft": {}}),
        ["score", "run", "--input", "rows.jsonl", "--output", "scored.jsonl"],
    ),
}


def table() -> dict[str, str]:
    """{bad input: message} from docs/errors.md's table (messages are written between backticks-free pipes)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.fullmatch(r"\| (.+?) \| (.+) \|", line)
        if m and m.group(1) not in ("bad input", "---"):
            rows[m.group(1)] = m.group(2).replace("\\|", "|")
    return rows


@pytest.fixture
def no_model(monkeypatch):
    import lowmem_rlhf.model.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input case loaded the model")

    monkeypatch.setattr(loading, "load_base", refuse)
    for stage in ("sft", "rm", "ppo", "dpo"):
        monkeypatch.setattr(f"lowmem_rlhf.stages.{stage}.load_base", refuse)
    # an unreachable Hub, the same on every machine: nothing listens on port 9 of this machine
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)


def test_table_lists_every_case_and_at_least_40():
    assert list(table()) == list(CASES)
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_documented_message(case, tmp_path, monkeypatch, capsys, no_model, tiny_path):
    files, argv = CASES[case]
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    got = errors[0].removeprefix("error: ").replace(str(tmp_path), "DIR")
    assert got == table().get(case), f"| {case} | {got} |"
