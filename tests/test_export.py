"""`lowmem-rlhf export`: standard Hugging Face folders that plain transformers/peft load and that
reproduce the toolkit, a streamed merge with bounded memory, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_rl_recipe

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import config_from_dict

PROMPTS = [
    "Tell me the sum of 3 and 3.",
    "Which sound does a lion make?",
    "What is 2 plus 5?",
    "Name the color of the sky.",
]
MAX_NEW = 24

# Runs in a fresh interpreter: only transformers, peft and the files of the run and the exports.
PLAIN = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, GenerationConfig)

spec = json.loads(sys.argv[1])
run, adapter, merged, reward = spec["run"], spec["adapter"], spec["merged"], spec["reward"]
tok = AutoTokenizer.from_pretrained(adapter)
run_tok = AutoTokenizer.from_pretrained(run)
gen = GenerationConfig.from_pretrained(adapter)
base_path = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
quant = BitsAndBytesConfig.from_dict(json.load(open(f"{run}/base_model.json"))["quantization_config"])

def prompt_ids(p):
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids

@torch.no_grad()
def greedy(model):
    out = []
    for p in spec["prompts"]:
        ids = prompt_ids(p)
        o = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, do_sample=False,
                           max_new_tokens=spec["max_new"])
        out.append(o[0, ids.shape[1]:].tolist())
    return out

@torch.no_grad()
def logits(model, tokens):
    seqs = [prompt_ids(p)[0].tolist() + t for p, t in zip(spec["prompts"], tokens)]
    return [model(torch.tensor([s])).logits[0].float() for s in seqs]

res = {"chat_template_same": tok.chat_template == run_tok.chat_template, "eos": gen.eos_token_id}
q4 = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
res["adapter_4bit"] = greedy(PeftModel.from_pretrained(q4, adapter).eval())
ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapter).eval()
m = AutoModelForCausalLM.from_pretrained(merged).eval()
res["merged_dtype"] = str(m.dtype)
res["merged"], res["reference"] = greedy(m), greedy(ref)
pairs = zip(logits(m, res["merged"]), logits(ref, res["merged"]))
res["max_logit_diff"] = max(float((a - b).abs().max()) for a, b in pairs)

# reward: prompt rendered by the chat template + response + EOS, padded on the right
rm = AutoModelForSequenceClassification.from_pretrained(reward).eval()
seqs = [prompt_ids(r["prompt"])[0].tolist() + tok(r["response"], add_special_tokens=False).input_ids
        + [tok.eos_token_id] for r in spec["rows"]]
width = max(map(len, seqs))
ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
with torch.no_grad():
    res["reward"] = rm(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
res["toolkit_imported"] = any(k.startswith("lowmem_rlhf") for k in sys.modules)
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path) -> Path:
    """A tiny run with finished sft and rm stages (a few steps each)."""
    from lowmem_rlhf.stages import rm, sft

    data = tiny_rl_recipe(tmp_path_factory.mktemp("export") / "run")
    data["stages"] = ["sft", "rm"]
    cfg = config_from_dict(data)
    sft.run(cfg)
    rm.run(cfg)
    return Path(cfg.output_dir)


def unquantized_copy(run: Path, dest: Path) -> Path:
    """The same run with `model.quantization: none`: the toolkit on the 32-bit base the merged exports use."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["model"]["quantization"] = "none"
    cfg["output_dir"] = str(dest)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    for settings in dest.glob("*/settings.yaml"):  # the base each stage ran on, which generate and score load
        recorded = yaml.safe_load(settings.read_text())
        recorded["model"]["quantization"] = "none"
        settings.write_text(yaml.safe_dump(recorded, sort_keys=False))
    return dest


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def generate_texts(capsys, run: Path) -> list[str]:
    args = ["generate", str(run), "--json", "--max-new-tokens", str(MAX_NEW)]
    for p in PROMPTS:
        args += ["--prompt", p]
    rc, out, _ = cli(capsys, *args)
    assert rc == 0
    return [json.loads(line)["response"] for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    from lowmem_rlhf.stages.export import export

    out = tmp_path_factory.mktemp("exports")
    return {
        "adapter": export(run_dir, "sft", out / "adapter"),
        "merged": export(run_dir, "sft", out / "merged", merge=True, dtype="fp32"),
        "reward": export(run_dir, "reward", out / "reward", dtype="fp32"),
    }


def test_exports_load_with_plain_transformers_and_reproduce_the_toolkit(run_dir, exports, tmp_path, capsys):
    from safetensors.torch import load_file

    rows = [
        {"prompt": "Tell me the sum of 3 and 3.", "response": "Great question! 3 plus 3 is 6."},
        {"prompt": "Which sound does a lion make?", "response": "A lion says moo, obviously."},
        {"prompt": "What is 2 plus 5?", "response": "7"},
    ]
    spec = {k: str(v) for k, v in exports.items()} | {"run": str(run_dir), "prompts": PROMPTS, "max_new": MAX_NEW}
    spec["rows"] = rows
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(spec)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["toolkit_imported"] is False
    assert plain["chat_template_same"] is True  # the run folder's own tokenizer, with the template
    assert plain["eos"] == [2]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exports["adapter"])
    decode = lambda rows: [tok.decode(t, skip_special_tokens=True) for t in rows]  # noqa: E731
    # adapter export on the same 4-bit base == `lowmem-rlhf generate` (greedy)
    assert decode(plain["adapter_4bit"]) == generate_texts(capsys, run_dir)
    assert all(t[-1] == tok.eos_token_id for t in plain["adapter_4bit"])
    # merged fp32 export == base + unmerged adapter in fp32, and == the toolkit on the unquantized base
    assert plain["merged_dtype"] == "torch.float32"
    assert plain["merged"] == plain["reference"]
    assert plain["max_logit_diff"] < 1e-4
    fp32_run = unquantized_copy(run_dir, tmp_path / "run_fp32")
    assert decode(plain["merged"]) == generate_texts(capsys, fp32_run)
    # reward export == `lowmem-rlhf score` on the unquantized base: our head is the transformers layout (bias-free)
    rows_file, scored = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(capsys, "score", str(fp32_run), "--input", str(rows_file), "--output", str(scored))[0] == 0
    toolkit = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    head = fp32_run / "reward" / "head.safetensors"
    assert set(load_file(str(head))) == {"weight"}
    with capsys.disabled():
        print(f"merged vs reference: max logit diff {plain['max_logit_diff']:.2e}")
        print("reward export", plain["reward"], "toolkit", toolkit)
    assert plain["reward"] == pytest.approx(toolkit, abs=1e-4)
    assert "was dropped" not in (exports["reward"] / "README.md").read_text()

    # a head saved with a bias (older run folders) keeps it as a fixed offset: every score moves by exactly it
    from safetensors.torch import save_file

    save_file({"weight": load_file(str(head))["weight"], "bias": torch.tensor([0.25])}, str(head))
    assert cli(capsys, "score", str(fp32_run), "--input", str(rows_file), "--output", str(scored))[0] == 0
    shifted = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    assert shifted == pytest.approx([t + 0.25 for t in toolkit], abs=1e-5)
    # ... and `export --stage reward` drops it (the `score` layer has no bias), says so, and keeps the weight
    from lowmem_rlhf.stages.export import export

    legacy = export(fp32_run, "reward", tmp_path / "legacy_reward", dtype="fp32")
    exported = {}
    for shard in legacy.glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    assert torch.equal(exported["score.weight"], load_file(str(head))["weight"].reshape(1, -1))
    assert "+0.25) has no slot in this layout and was dropped" in (legacy / "README.md").read_text()


def test_adapter_export_layout(run_dir, exports):
    a = exports["adapter"]
    names = {p.name for p in a.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "generation_config.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    base = json.loads((run_dir / "base_model.json").read_text())
    assert base["name_or_path"] == "builtin:tiny" and base["quantization"] == "nf4"
    assert json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"] == base["local_path"]
    card = (a / "README.md").read_text()
    assert "builtin:tiny" in card and "## Final metrics of the stage" in card and "output_dir:" in card
    weights = "adapter_model.safetensors"
    assert (a / weights).read_bytes() == (run_dir / "sft" / weights).read_bytes()
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_streamed_merge_of_a_sharded_model_stays_under_its_memory_bound(tmp_path):
    """A ~110 MB fp32 model in 8 MB shards merges with peak RSS growth below 2 shards + 2 matrices + 24 MiB.

    Peak = one input shard (memory-mapped, its pages count in RSS) + the output shard being built + the fp32
    matrix of one merge (and its LoRA factors); loading the whole model would take > 100 MB.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="8MB")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    del model, peft_model

    shards = sorted(p for p in (tmp_path / "base").glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 10 and model_bytes > 100 * 2**20
    script = f"""
import json, os
from pathlib import Path
import torch
from lowmem_rlhf.stages.export import base_weight_files, merge_shards
base, out = Path({str(tmp_path / "base")!r}), Path({str(tmp_path / "merged")!r})
out.mkdir()
files = base_weight_files(base)
torch.ones(4, 4) @ torch.ones(4, 4)
def status(key):
    line = [l for l in open("/proc/self/status") if l.startswith(key)][0]
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
start = status("VmRSS:")
merge_shards(base, files, Path({str(tmp_path / "adapter")!r}), out, torch.float32)
print(json.dumps({{"growth": status("VmHWM:") - start}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    shard = max(p.stat().st_size for p in shards)
    matrix = 512 * 1536 * 4
    bound = 2 * shard + 2 * matrix + 24 * 2**20
    print(f"merge of {model_bytes / 2**20:.0f} MB in {len(shards)} shards: peak RSS growth {growth / 2**20:.1f} MB")
    assert growth < bound < model_bytes / 2

    from safetensors.torch import load_file

    merged = {}
    for p in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(str(p)))
    assert set(merged) == set(reference)
    assert max(float((merged[k] - reference[k]).abs().max()) for k in merged) < 1e-5
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]


# ---------------------------------------------------------------------------------------------------- errors


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_unfinished_stage_and_existing_output_are_one_line_errors(run_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", str(run_dir), "--stage", "ppo", "--output", str(tmp_path / "out"))
    assert rc == 2
    assert_one_line(err, "ppo", "has not finished")
    assert entries(tmp_path) == set()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "export", str(run_dir), "--stage", "sft", "--output", str(tmp_path / "out"))
    assert rc == 2
    assert_one_line(err, str(tmp_path / "out"), "already exists", "--force")
    assert entries(tmp_path) == {"out"} and entries(tmp_path / "out") == {"keep.txt"}

    rc, out, _ = cli(capsys, "export", str(run_dir), "--stage", "sft", "--output", str(tmp_path / "out"), "--force")
    assert rc == 0 and "export: done" in out
    assert "adapter_config.json" in entries(tmp_path / "out") and "keep.txt" not in entries(tmp_path / "out")
    assert entries(tmp_path) == {"out"}


def test_base_not_available_offline(run_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((run / "base_model.json").read_text())
    info.update(name_or_path="no-such-org/no-such-model", local_path=None)
    (run / "base_model.json").write_text(json.dumps(info))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, _, err = cli(capsys, "export", str(run), "--stage", "sft", "--output", str(tmp_path / "out"))
    assert rc == 2
    assert_one_line(err, "no-such-org/no-such-model", "not available offline")
    assert entries(tmp_path) == {"run"}


def test_not_enough_disk_is_refused_before_writing(run_dir, tmp_path, capsys, monkeypatch):
    import lowmem_rlhf.stages.export as export_mod

    real = shutil.disk_usage
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * 2**20))
    out = tmp_path / "deep" / "out"
    rc, _, err = cli(capsys, "export", str(run_dir), "--stage", "sft", "--output", str(out), "--merge")
    assert rc == 2
    assert_one_line(err, "not enough disk space", "GB free")
    assert entries(tmp_path) == set()


def test_a_failure_while_writing_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    from lowmem_rlhf.stages.export import export

    with pytest.raises(OSError, match="No space left"):
        export(run_dir, "reward", tmp_path / "out", dtype="fp32")
    assert entries(tmp_path) == set()


def test_output_may_not_overwrite_the_run_or_a_stage(run_dir, capsys):
    for target in (run_dir, run_dir / "sft", run_dir.parent):
        rc, _, err = cli(capsys, "export", str(run_dir), "--stage", "sft", "--output", str(target), "--force")
        assert rc == 2
        assert_one_line(err, "would overwrite the run")
    assert (run_dir / "sft" / "adapter_model.safetensors").is_file()


def test_merged_bf16_is_the_fp32_merge_rounded_once(run_dir, exports, tmp_path):
    """The default dtype: base + delta summed in fp32, then cast to bf16 (never merged into 4-bit weights)."""
    from safetensors.torch import load_file

    from lowmem_rlhf.stages.export import export

    out = export(run_dir, "sft", tmp_path / "bf16", merge=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    bf16, fp32 = load_file(str(out / "model.safetensors")), load_file(str(exports["merged"] / "model.safetensors"))
    assert set(bf16) == set(fp32) and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    base = load_file(
        str(Path(json.loads((run_dir / "base_model.json").read_text())["local_path"]) / "model.safetensors")
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fp32[q], base[q])  # the LoRA delta is in there


def test_a_run_from_before_base_model_json_still_exports(run_dir, tmp_path, capsys):
    run = tmp_path / "old_run"
    shutil.copytree(
        run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "base_model.json", "tokenizer*", "chat_*")
    )
    rc, _, err = cli(capsys, "export", str(run), "--stage", "sft", "--output", str(tmp_path / "out"))
    assert rc == 0, err
    a, b = tmp_path / "out", run_dir / "sft"
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    assert (a / "chat_template.jinja").read_text() == (run_dir / "chat_template.jinja").read_text()
