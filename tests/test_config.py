"""Strict recipes: unknown keys, wrong types, overrides, and the generated reference."""

from pathlib import Path

import pytest

from lowmem_rlhf.config import apply_overrides, config_from_dict, load_config, markdown_reference
from lowmem_rlhf.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_fill_every_section(tmp_path):
    cfg = load_config(write(tmp_path, "output_dir: x\n"))
    assert cfg.model.quantization == "nf4" and cfg.model.double_quant is True
    assert cfg.model.attn_implementation == "sdpa" and cfg.model.trust_remote_code is False
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.sft.report_to == [] and cfg.sft.gradient_checkpointing is True


def test_unknown_key_names_key_and_closest(tmp_path):
    p = write(tmp_path, "sft:\n  learning_rat: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key `sft.learning_rat`; did you mean 'learning_rate'\?") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_wrong_type_names_expected_and_given(tmp_path):
    with pytest.raises(UserError, match=r"`sft.max_steps` expects int, got str 'ten'"):
        load_config(write(tmp_path, "sft:\n  max_steps: ten\n"))
    with pytest.raises(UserError, match=r"`model.quantization` expects one of 'nf4', 'fp4', 'int8', 'none'"):
        load_config(write(tmp_path, "model:\n  quantization: nf3\n"))
    with pytest.raises(UserError, match=r"`lora.dropout` expects float, got bool"):
        load_config(write(tmp_path, "lora:\n  dropout: true\n"))
    with pytest.raises(UserError, match=r"`model` must be a mapping"):
        load_config(write(tmp_path, "model: tiny\n"))


def test_value_checks_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"`sft.batch_size` must be at least 1, got 0"):
        load_config(write(tmp_path, "sft:\n  batch_size: 0\n"))
    with pytest.raises(UserError, match=r"`sft.report_to` has unknown sink 'tensorbord'"):
        load_config(write(tmp_path, "sft:\n  report_to: [tensorbord]\n"))


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field still accepts it.
    assert load_config(write(tmp_path, "sft:\n  learning_rate: 1e-4\n")).sft.learning_rate == 1e-4


def test_overrides_go_through_the_same_checks(tmp_path):
    p = write(tmp_path, "sft:\n  learning_rate: 0.1\n")
    cfg = load_config(p, ["sft.learning_rate=1e-4", "lora.r=4", "sft.report_to=[tensorboard]"])
    assert (cfg.sft.learning_rate, cfg.lora.r, cfg.sft.report_to) == (1e-4, 4, ["tensorboard"])
    with pytest.raises(UserError, match="unknown key `sft.lr`"):
        load_config(p, ["sft.lr=1"])
    with pytest.raises(UserError, match="`lora.r` expects int"):
        load_config(p, ["lora.r=big"])
    with pytest.raises(UserError, match="must look like"):
        apply_overrides({}, ["lora.r"])


def test_unknown_stage_and_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="unknown stage 'ppx'"):
        config_from_dict({"stages": ["ppx"]})
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="invalid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n b: [\n"))


def test_config_reference_doc_is_current():
    doc = (REPO / "docs" / "config.md").read_text()
    assert doc.strip() == markdown_reference().strip(), "run `python -m lowmem_rlhf.config > docs/config.md`"


def test_every_shipped_recipe_validates():
    from lowmem_rlhf.cli import main

    recipes = sorted(str(p) for p in (REPO / "recipes").rglob("*.yaml"))
    assert recipes
    assert main(["validate", *recipes]) == 0
