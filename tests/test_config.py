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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.max_length=0", "`sft.max_length` must be at least 2, got 0"),
        ("rm.max_length=-5", "`rm.max_length` must be at least 2, got -5"),
        ("lora.r=0", "`lora.r` must be at least 1, got 0"),
        ("sft.learning_rate=-1e-4", "`sft.learning_rate` must be positive, got -0.0001"),
        ("ppo.learning_rate=.nan", "`ppo.learning_rate` must be a finite number, got nan"),
        ("dpo.learning_rate=inf", "`dpo.learning_rate` must be a finite number, got inf"),
        ("sft.warmup_ratio=1.5", "`sft.warmup_ratio` must be in [0, 1], got 1.5"),
        ("ppo.warmup_ratio=-0.1", "`ppo.warmup_ratio` must be in [0, 1], got -0.1"),
        ("ppo.clip_range=-0.2", "`ppo.clip_range` must be positive, got -0.2"),
        ("ppo.clip_range_value=-1", "`ppo.clip_range_value` must be positive, got -1.0"),
        ("lora.dropout=1", "`lora.dropout` must be in [0, 1), got 1.0"),
        ("lora.dropout=-0.1", "`lora.dropout` must be in [0, 1), got -0.1"),
        ("ppo.top_p=0", "`ppo.top_p` must be in (0, 1], got 0.0"),
        ("compare.top_p=1.2", "`compare.top_p` must be in (0, 1], got 1.2"),
        ("sft.save_total_limit=0", "`sft.save_total_limit` must be at least 1, got 0"),
        ("ppo.save_total_limit=0", "`ppo.save_total_limit` must be at least 1, got 0"),
        ("stages=[]", "`stages` is empty; list at least one of sft, rm, ppo, dpo, compare"),
        ("sft.max_steps=0", "`sft.max_steps` must be at least 1, or -1 (num_epochs passes), got 0"),
        ("sft.max_steps=-2", "`sft.max_steps` must be at least 1, or -1 (num_epochs passes), got -2"),
        ("sft.num_epochs=0", "`sft.num_epochs` must be positive, got 0.0"),
        ("ppo.length_penalty=.inf", "`ppo.length_penalty` must be a finite number, got inf"),
        ("ppo.temperature=0", "`ppo.temperature` must be positive, got 0.0"),
        ("compare.temperature=-1", "`compare.temperature` must be 0 or more, got -1.0"),
        ("dpo.label_smoothing=0.5", "`dpo.label_smoothing` must be in [0, 0.5), got 0.5"),
        ("sft.max_samples=0", "`sft.max_samples` must be at least 1, got 0"),
        ("seed=-1", "`seed` must be in [0, 4294967295], got -1"),
    ],
)
def test_out_of_range_settings_name_the_key_and_the_file(tmp_path, override, message):
    p = write(tmp_path, "output_dir: x\n")
    with pytest.raises(UserError) as e:
        load_config(p, [override])
    assert str(e.value) == f"recipe {p} (with overrides): {message}"


def test_range_edges_and_special_values_are_accepted(tmp_path):
    cfg = load_config(
        write(tmp_path, "output_dir: x\n"),
        ["sft.max_steps=-1", "sft.warmup_ratio=1", "lora.dropout=0", "ppo.top_p=1", "compare.temperature=0"],
    )
    assert (cfg.sft.max_steps, cfg.sft.warmup_ratio, cfg.lora.dropout, cfg.ppo.top_p) == (-1, 1.0, 0.0, 1.0)
    assert load_config(write(tmp_path, "sft:\n  max_steps: 1\n  max_length: 2\n")).sft.max_steps == 1
