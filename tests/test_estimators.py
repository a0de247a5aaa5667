"""The advantage-estimator registry is what the recipe check, the docs, `estimate` and `compare` read."""

import re
import typing
from dataclasses import fields, replace

import pytest
from conftest import REPO

from lowmem_rlhf.config import PPOConfig, config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATORS, markdown_table
from lowmem_rlhf.model.memory import estimate_stage, resolve_shape
from lowmem_rlhf.stages.compare import Run, method_of


def test_docs_table_is_the_registry():
    doc = (REPO / "docs" / "ppo.md").read_text()
    table = re.search(r"<!-- estimators table[^\n]*-->\n(.*?)\n<!-- end of estimators table -->", doc, re.S)
    assert table is not None, "docs/ppo.md lost its estimators table markers"
    assert table.group(1).strip() == markdown_table(), "paste lowmem_rlhf.estimators.markdown_table() into ppo.md"
    for name in ESTIMATORS:
        assert f"| `{name}` |" in table.group(1)


def test_recipe_accepts_exactly_the_registered_estimators(tmp_path):
    assert typing.get_args(typing.get_type_hints(PPOConfig)["advantage"]) == tuple(ESTIMATORS)
    help_text = next(f.metadata["help"] for f in fields(PPOConfig) if f.name == "advantage")
    assert all(name in help_text for name in ESTIMATORS)
    data = {"output_dir": str(tmp_path), "ppo": {"advantage": "reinforce_pp", "group_size": 1}}
    assert config_from_dict(data).ppo.advantage == "reinforce_pp"  # one sample per prompt: no group needed
    data["ppo"] = {"advantage": "rloo", "group_size": 1}
    with pytest.raises(UserError, match="`ppo.group_size` must be at least 2 for advantage=rloo, got 1"):
        config_from_dict(data)
    data["ppo"] = {"advantage": "dr_grpo"}
    with pytest.raises(UserError, match="reinforce_pp"):
        config_from_dict(data)


def test_estimate_reads_critic_and_samples_per_prompt(tmp_path):
    shape, _ = resolve_shape("qwen2.5-0.5b")
    base = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "model": {"name_or_path": "qwen2.5-0.5b"},
            "ppo": {"rollout_batch_size": 8, "max_prompt_length": 128, "max_new_tokens": 128, "group_size": 4},
        }
    )

    def items(advantage: str) -> dict:
        return dict(estimate_stage(replace(base, ppo=replace(base.ppo, advantage=advantage)), shape, "ppo").items)

    s = 128 + 128
    gae, grpo, rpp = items("gae"), items("grpo"), items("reinforce_pp")
    assert "LoRA adapters (fp32): policy, reference, reward, value" in gae
    assert (
        "LoRA adapters (fp32): policy, reference, reward" in rpp
        and gae["score/value heads"] == 2 * rpp["score/value heads"]
    )
    # rollout buffers: 8 prompts x 1 sample for gae and reinforce_pp, x 4 for grpo; 8 + 4 * 6 bytes per position
    buffers = "rollout buffers (ids, log-probs, values, advantages)"
    assert rpp[buffers] == gae[buffers] == 8 * s * 32 and grpo[buffers] == 32 * s * 32
    assert rpp == items("remax")  # both: one sample per prompt, no critic


def test_compare_names_each_method_by_its_label(tmp_path):
    cfg = config_from_dict({"output_dir": str(tmp_path), "ppo": {"advantage": "reinforce_pp"}})
    run = Run(tmp_path, "r", cfg, {}, {}, cfg.model)
    assert method_of(run, "ppo") == "reinforce++" and method_of(run, "dpo") == "dpo"
    plain = config_from_dict({"output_dir": str(tmp_path)})
    assert method_of(Run(tmp_path, "r", plain, {}, {}, plain.model), "ppo") == "ppo"
    # the settings the stage ran with win over a later config.yaml
    recorded = Run(tmp_path, "r", plain, {}, {"ppo": {"ppo": {"advantage": "rloo"}}}, plain.model)
    assert method_of(recorded, "ppo") == ESTIMATORS["rloo"].label
