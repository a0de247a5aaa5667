"""Every stage on every model family users train (micro models built in code, tests/families.py), offline.

What breaks RLHF code on real families and is checked here per family: generation stops at the
end-of-turn ids (a list, next to an end-of-text EOS), the template's closing end-of-turn token is an
SFT label, a missing pad token hides no label, `all-linear` LoRA lands on fused modules, the
estimator's byte counts equal the loaded model's, and PPO/GRPO keep step-0 KL 0, the first-minibatch
ratio 1 and every frozen weight byte-identical. docs/families.md's table is generated from this file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_fingerprint, loaded_bytes
from families import FAMILIES, build_family

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import LoRAConfig, ModelConfig, config_from_dict
from lowmem_rlhf.data.chat import end_of_turn_ids, to_messages
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.prompts import tokenize_prompts
from lowmem_rlhf.data.sft import collate_sft, tokenize_sft
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, load_tokenizer
from lowmem_rlhf.model.memory import (
    buffer_bytes,
    lora_tensors,
    quantized_weight_bytes,
    resolve_shape,
    unquantized_bytes,
)
from lowmem_rlhf.rollout.generate import SamplingConfig, generate, stop_token_ids
from lowmem_rlhf.stages import compare, dpo, ppo, rm, sft
from lowmem_rlhf.train.metrics import read_metrics
from lowmem_rlhf.train.ppo import PPOTrainer

REPO = Path(__file__).resolve().parents[1]
NAMES = list(FAMILIES)
# what test_every_stage_runs_on_the_family runs and checks, in order: the columns of docs/families.md
STAGES = ("sft", "rm", "ppo (gae)", "ppo (grpo)", "dpo", "compare", "generate", "score", "estimate")

_built: dict[str, Path] = {}


def family_path(name: str) -> Path:
    if name not in _built:
        _built[name] = build_family(name)
    return _built[name]


def family_recipe(name: str, out: Path, **ppo_keys) -> dict:
    return {
        "output_dir": str(out),
        "seed": 3,
        "stages": ["sft", "rm", "ppo", "dpo", "compare"],
        "model": {"name_or_path": str(family_path(name)), "device": "cpu", "quantization": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "sft": {
            "dataset": "builtin:tiny/sft.jsonl",
            "max_samples": 64,
            "max_steps": 4,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "save_steps": 0,
            "max_length": 96,
        },
        "rm": {
            "dataset": "builtin:tiny/rankings.jsonl",
            "max_samples": 16,
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "save_steps": 0,
            "max_length": 96,
            "stats_samples": 16,
        },
        "ppo": {
            "dataset": "builtin:tiny/prompts.jsonl",
            "num_steps": 2,
            "rollout_batch_size": 8,
            "mini_batch_size": 4,
            "micro_batch_size": 4,
            "ppo_epochs": 1,
            "learning_rate": 1e-3,
            "max_new_tokens": 16,
            "save_steps": 0,
            "group_size": 2,
            **ppo_keys,
        },
        "dpo": {
            "dataset": "builtin:tiny/rankings.jsonl",
            "max_samples": 16,
            "max_steps": 2,
            "batch_size": 4,
            "save_steps": 0,
            "eval_steps": 0,
            "max_length": 96,
        },
        "compare": {"prompts": "builtin:tiny/prompts_heldout.jsonl", "num_prompts": 8, "max_new_tokens": 16},
    }


@pytest.fixture(scope="module", params=NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline(family, tmp_path_factory) -> dict:
    """SFT -> RM -> PPO (GAE) -> DPO -> compare on the family, then GRPO from the same SFT and RM; each RL
    trainer is kept with the role weights and the base fingerprint from before its training."""
    out = tmp_path_factory.mktemp(family) / "run"
    seen: dict = {}
    real_run = PPOTrainer.run

    def run(self):
        seen[self.pc.advantage] = {
            "trainer": self,
            "before": {r: self.bank.state_dict(r) for r in self.bank.roles},
            "base": base_fingerprint(self.bank.peft_model),
        }
        return real_run(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PPOTrainer, "run", run)
        cfg = config_from_dict(family_recipe(family, out))
        for stage in (sft, rm, ppo, dpo, compare):
            stage.run(cfg)
        grpo = out.parent / "grpo"
        shutil.copytree(out, grpo, ignore=shutil.ignore_patterns("ppo", "dpo", "compare"))
        manifest = json.loads((grpo / "manifest.json").read_text())
        manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("sft", "rm")}
        (grpo / "manifest.json").write_text(json.dumps(manifest))
        ppo.run(config_from_dict(family_recipe(family, grpo, advantage="grpo")))
    return {"out": out, "grpo": grpo, "seen": seen}


def test_sft_labels_end_with_the_templates_end_of_turn(family):
    f = FAMILIES[family]
    tok = load_tokenizer(ModelConfig(name_or_path=str(family_path(family)), device="cpu"))
    eot = tok.convert_tokens_to_ids(f.end_of_turn)
    assert end_of_turn_ids(tok)[0] == eot
    if f.pad is None:  # no pad token: a pad is chosen that is not the end-of-turn token's job to mark
        assert tok.pad_token_id is not None
    rows, name = load_rows("builtin:tiny/sft.jsonl")
    examples, _ = tokenize_sft(rows[:8], tok, 96, name)
    batch = collate_sft(examples, tok.pad_token_id)
    for i, e in enumerate(examples):
        last = len(e.input_ids) - 1
        # the response closes with the template's end-of-turn token, and that token is a label ...
        assert e.input_ids[last] == eot, tok.convert_ids_to_tokens(e.input_ids[-3:])
        assert batch["response_mask"][i, last]
        # ... even where it doubles as the pad id in a right-padded batch
        assert batch["response_mask"][i].sum() == len(e.input_ids) - e.prompt_len
        # the prompt is the tokenizer's own template, ending with its assistant header
        messages = to_messages(rows[i]["prompt"], name, "prompt")
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert e.input_ids[: e.prompt_len] == tok(rendered, add_special_tokens=False).input_ids


def test_generation_stops_at_the_end_of_turn_ids(family):
    f = FAMILIES[family]
    model, tok = load_base(ModelConfig(name_or_path=str(family_path(family)), device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=8)))  # B = 0: the pre-trained base's own outputs
    rows, name = load_rows("builtin:tiny/prompts_heldout.jsonl")
    prompts, _, _ = tokenize_prompts(rows[:16], tok, 64, name)
    gen = generate(bank, "policy", prompts, SamplingConfig(24, 0.0), end_of_turn_ids(tok), tok.pad_token_id)
    stops = set(stop_token_ids(bank, end_of_turn_ids(tok)))
    assert {tok.convert_tokens_to_ids(t) for t in f.generation_eos} <= stops  # the model's own list is honoured
    eot = tok.convert_tokens_to_ids(f.end_of_turn)
    # the base closes its turns with the family's end-of-turn token, and generation stops right there
    # (at least half of the greedy responses: 14-16 of 16 here; 0-5 when only the tokenizer's EOS stopped them)
    assert sum(r[-1] == eot for r in gen.response_ids) >= 8, [tok.decode(r) for r in gen.response_ids]
    for r, ended in zip(gen.response_ids, gen.ended, strict=True):
        assert ended == (r[-1] in stops)
        assert not stops & set(r[:-1])  # nothing after the first stop id
        text = tok.decode(r, skip_special_tokens=True)
        assert not any(s in text for s in tok.all_special_tokens), text


def test_the_input_table_in_host_memory_on_the_family(family):
    """model.embeddings: host gives the same logits and greedy rollout as the table on the device (each family's
    own embedding module, Gemma's scaled one included, runs in host memory); a tied table is refused in one line."""
    cfg = ModelConfig(name_or_path=str(family_path(family)), device="cpu")
    model, tok = load_base(cfg)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        with pytest.raises(UserError, match=r"model\.embeddings is 'host'.*tied"):
            load_base(ModelConfig(name_or_path=cfg.name_or_path, device="cpu", embeddings="host"))
        return
    host, _ = load_base(ModelConfig(name_or_path=cfg.name_or_path, device="cpu", embeddings="host"))
    ids = torch.tensor([tok("The cat sat on the mat.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(host(ids).logits, model(ids).logits)
    rows, name = load_rows("builtin:tiny/prompts_heldout.jsonl")
    prompts, _, _ = tokenize_prompts(rows[:4], tok, 64, name)
    gens = []
    for m in (model, host):
        bank = AdapterBank(m, gradient_checkpointing=False)
        bank.add_role("policy", lora=lora_config(LoRAConfig(r=8)))  # B = 0: the base's own outputs
        gen = generate(bank, "policy", prompts, SamplingConfig(12, 0.0), end_of_turn_ids(tok), tok.pad_token_id)
        gens.append(gen.response_ids)
    assert gens[0] == gens[1] and any(gens[0])


def test_every_stage_runs_on_the_family(family, pipeline, tmp_path, capsys):
    out, seen = pipeline["out"], pipeline["seen"]
    done = json.loads((out / "manifest.json").read_text())["stages"]
    assert set(done) == {"sft", "rm", "ppo", "dpo", "compare"}
    for advantage, run_dir in (("gae", out), ("grpo", pipeline["grpo"])):
        rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
        # pitfalls 1 and 6: the reference is the frozen SFT copy, the first minibatch sees the rollout's log-probs
        assert rows[0]["kl"] == 0.0 and all(r["first_minibatch_max_logratio"] == 0.0 for r in rows), advantage
        t, before = seen[advantage]["trainer"], seen[advantage]["before"]
        frozen = [r for r in t.bank.roles if not t.bank.roles[r].trainable]
        assert set(frozen) == {"reference", "reward"}
        for role in frozen:
            after = t.bank.state_dict(role)
            assert all(torch.equal(after[k], v) for k, v in before[role].items()), (advantage, role)
        assert any(not torch.equal(t.bank.state_dict("policy")[k], v) for k, v in before["policy"].items())
        assert base_fingerprint(t.bank.peft_model) == seen[advantage]["base"]
        # every response of the last rollout is cut at its first stop id, and the logged EOS rate counts them
        ro = t.last_rollout
        for i, r in enumerate(ro.response_ids):
            assert int(ro.response_mask[i].sum()) == len(r) or not r
            assert not t.stop_ids & set(r[:-1])
        ended = [bool(r) and r[-1] in t.stop_ids for r in ro.response_ids]
        assert rows[-1]["eos_rate"] == pytest.approx(sum(ended) / len(ended))

    report = json.loads((out / "compare" / "report.json").read_text())
    assert set(report["order"]) == {f"{out.name}/sft", f"{out.name}/ppo", f"{out.name}/dpo"}
    samples = [json.loads(line) for line in (out / "compare" / "samples.jsonl").read_text().splitlines()]
    for label, policy in report["policies"].items():  # the EOS rate is the share of samples that ended
        flags = [row["eos"] for row in samples if row["policy"] == label]
        assert flags and policy["eos_rate"] == pytest.approx(sum(flags) / len(flags))

    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 2 plus 3?", "--json", "--max-new-tokens", "16"]) == 0
    response = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["response"]
    tok = load_tokenizer(ModelConfig(name_or_path=str(family_path(family)), device="cpu"))
    assert not any(s in response for s in tok.all_special_tokens), response

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5."}) + "\n")
    assert main(["score", str(out), "--input", str(rows), "--output", str(tmp_path / "scored.jsonl")]) == 0
    scored = json.loads((tmp_path / "scored.jsonl").read_text())
    assert torch.isfinite(torch.tensor(scored["reward"]))

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(family_recipe(family, tmp_path / "unused")))
    assert main(["estimate", str(recipe), "--gpu-memory", "16GB"]) == 0

    # the run folder alone gives the tokenizer every stage used, chat template and end of turn included
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.chat_template == tok.chat_template and end_of_turn_ids(saved) == end_of_turn_ids(tok)
    assert json.loads((out / "base_model.json").read_text())["local_path"] == str(family_path(family))


def test_an_architecture_without_sdpa_loads_with_eager_attention_and_says_so(caplog):
    model, _ = load_base(ModelConfig(name_or_path=str(family_path("gemma2")), device="cpu"))
    assert model.config._attn_implementation == "eager"
    assert "Gemma2ForCausalLM has no SDPA attention; using model.attn_implementation=eager" in caplog.text


def test_estimator_counts_equal_the_loaded_model(family):
    model, _ = load_base(ModelConfig(name_or_path=str(family_path(family)), device="cpu"))
    shape, _ = resolve_shape(str(family_path(family)))
    q = quantized_weight_bytes(shape, "nf4", True, 4)  # CPU computes in fp32
    counted = {**q, "unquantized": unquantized_bytes(shape, 4), "buffers": buffer_bytes(shape)}
    assert counted == loaded_bytes(model)

    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=8)))
    lora = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n}
    assert sum(lora.values()) == sum(lora_tensors(shape, 8, "all-linear"))
    # all-linear reaches every linear layer of the architecture, fused ones included, and never lm_head
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets == {name for name, *_ in shape.linears()}


def families_table() -> str:
    def code(token: str) -> str:
        return "`" + token.replace("|", "\\|") + "`"  # a bare | would end the table cell

    head = ["family", "class", "end of turn", "generation EOS ids", "pad", *STAGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in FAMILIES.values():
        eos = ", ".join(code(t) for t in f.generation_eos)
        pad = code(f.pad) if f.pad else "none"
        cells = [f.name, f"{f.model_type}ForCausalLM", code(f.end_of_turn), eos, pad, *("✓" for _ in STAGES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_docs_table_matches_the_families_tested():
    """docs/families.md carries the table this file generates (LOWMEM_RLHF_WRITE_DOCS=1 rewrites it)."""
    doc = REPO / "docs" / "families.md"
    start, end = "<!-- families table: generated by tests/test_families.py -->\n", "<!-- end of table -->"
    text = doc.read_text()
    before, rest = text.split(start)
    _, after = rest.split(end)
    if os.environ.get("LOWMEM_RLHF_WRITE_DOCS"):
        doc.write_text(before + start + families_table() + end + after)
    assert doc.read_text() == before + start + families_table() + end + after
