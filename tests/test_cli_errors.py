"""User-caused errors exit non-zero with one line naming the problem, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowmem_rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def recipe(tmp_path):
    def write(text: str) -> Path:
        p = tmp_path / "recipe.yaml"
        p.write_text(text)
        return p

    return write


def test_unknown_key(recipe, tmp_path):
    p = recipe("output_dir: out\nsft:\n  datset: x.jsonl\n")
    assert_one_line_error(run_cli("sft", str(p), cwd=tmp_path), str(p), "sft.datset", "dataset")


def test_wrong_type(recipe, tmp_path):
    p = recipe("sft:\n  batch_size: four\n")
    assert_one_line_error(run_cli("show", str(p), cwd=tmp_path), "sft.batch_size", "expects int", "str")


def test_missing_recipe(tmp_path):
    assert_one_line_error(run_cli("run", "missing.yaml", cwd=tmp_path), "missing.yaml", "not found")


def test_missing_data_file(recipe, tmp_path):
    p = recipe("output_dir: out\nsft:\n  dataset: data/none.jsonl\n")
    assert_one_line_error(run_cli("sft", str(p), cwd=tmp_path), "data/none.jsonl", "not found")
    assert_one_line_error(run_cli("validate", str(p), cwd=tmp_path), "data/none.jsonl")


def test_data_row_missing_field(recipe, tmp_path, tiny_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": "What is 1 plus 1?", "completion": "1 plus 1 is 2."}, {"prompt": "What is 2 plus 2?"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = recipe(f"output_dir: out\nmodel:\n  device: cpu\nsft:\n  dataset: {data}\n")
    assert_one_line_error(run_cli("sft", str(p), cwd=tmp_path), str(data), "row 2", "completion")
    assert not (tmp_path / "out" / "sft" / "adapter_model.safetensors").exists()


def test_bad_override(recipe, tmp_path):
    p = recipe("output_dir: out\n")
    assert_one_line_error(run_cli("show", str(p), "lora.rank=4", cwd=tmp_path), "lora.rank", "valid keys: r, alpha")


def test_show_prints_resolved_config(recipe, tmp_path):
    p = recipe("output_dir: out\nlora:\n  r: 4\n")
    proc = run_cli("show", str(p), "sft.learning_rate=1e-5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "r: 4" in proc.stdout and "learning_rate: 1.0e-05" in proc.stdout and "quantization: nf4" in proc.stdout


def test_help_for_every_command(tmp_path):
    for cmd in ("run", "sft", "validate", "show", "generate"):
        proc = run_cli(cmd, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "usage: lowmem-rlhf " + cmd in proc.stdout
