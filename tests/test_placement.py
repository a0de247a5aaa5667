"""`model.embeddings: host`: the input-embedding table in host memory changes no number a stage computes, and
the memory it saves is what the estimator and the tracer count."""

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_rlhf.config import ModelConfig, config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.model.memory import embeddings_on_host, estimate_stage, resolve_shape, rounded
from lowmem_rlhf.model.placement import HostEmbedding, is_tied, keep_embeddings_on_host
from lowmem_rlhf.stages import sft
from lowmem_rlhf.stages.common import stage_model, stage_settings
from lowmem_rlhf.train.metrics import read_metrics


def test_where_the_table_lives():
    assert embeddings_on_host("auto", "cuda", tied=False)
    assert not embeddings_on_host("auto", "cpu", tied=False)  # nothing to save on a CPU
    assert not embeddings_on_host("auto", "cuda", tied=True)  # lm_head multiplies by the whole table
    assert not embeddings_on_host("auto", "cuda", tied=False, compiled_decoding=True)
    assert embeddings_on_host("host", "cpu", tied=False)
    assert not embeddings_on_host("device", "cuda", tied=False)
    with pytest.raises(UserError, match=r"model\.embeddings is 'host'.*tied"):
        embeddings_on_host("host", "cuda", tied=True)


def test_host_with_a_compiled_decode_step_is_refused(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["embeddings"] = "host"
    data["ppo"] = {"generation_cache": "static", "compile_generation": True}
    with pytest.raises(UserError, match=r"model\.embeddings: host and ppo\.compile_generation"):
        config_from_dict(data)


def test_placement_is_not_a_setting_results_depend_on(tmp_path):
    """Moving the table changes no value, so a run folder's fingerprints (resume, finished stages) ignore it."""
    a, b = tiny_recipe(tmp_path / "run"), tiny_recipe(tmp_path / "run")
    b["model"]["embeddings"] = "host"
    assert stage_settings(config_from_dict(a), "sft") == stage_settings(config_from_dict(b), "sft")


def test_a_finished_stage_loads_with_the_runs_placement(tmp_path):
    """`generate`, `score` and `compare` rebuild a stage's model settings from its settings.yaml, which leaves the
    placement out: the run's own config says where the table goes."""
    data = tiny_recipe(tmp_path / "run")
    stage_dir = tmp_path / "run" / "sft"
    stage_dir.mkdir(parents=True)
    (stage_dir / "settings.yaml").write_text(yaml.safe_dump(stage_settings(config_from_dict(data), "sft")))
    data["model"]["embeddings"] = "device"
    model = stage_model(stage_dir, config_from_dict(data))
    assert (model.embeddings, model.name_or_path, model.device) == ("device", "builtin:tiny", "cpu")


def test_the_table_leaves_the_parameters_and_every_output_stays(tiny_path):
    device_model, _ = load_base(ModelConfig(device="cpu"))
    host_model, _ = load_base(ModelConfig(device="cpu", embeddings="host"))
    wrapper = host_model.get_input_embeddings()
    assert isinstance(wrapper, HostEmbedding)
    table = device_model.get_input_embeddings().weight
    assert torch.equal(wrapper.weight, table) and wrapper.weight.device.type == "cpu"
    names = [n for n, _ in host_model.named_parameters()]
    assert not any("embed_tokens.weight" in n for n in names)
    assert "model.embed_tokens.weight" not in host_model.state_dict()
    # transformers reads the first parameter for both: the anchor, on the compute device in the compute dtype,
    # keeps them what the table made them
    assert next(host_model.parameters()) is wrapper.anchor and wrapper.anchor.numel() == 0
    assert (host_model.device, host_model.dtype) == (device_model.device, device_model.dtype)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        assert torch.equal(host_model(ids).logits, device_model(ids).logits)
    outs = []
    for m in (device_model, host_model):
        torch.manual_seed(3)
        outs.append(m.generate(input_ids=ids, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0))
    assert torch.equal(*outs)


def test_sft_with_the_table_in_host_memory_is_bit_identical(tmp_path, tiny_path):
    """Same losses, gradient norms and adapter bytes (dropout on: the RNG streams line up too)."""
    runs = {}
    for where in ("device", "host"):
        data = tiny_recipe(tmp_path / where, max_steps=4, save_steps=0)
        data["model"]["embeddings"] = where
        runs[where] = sft.run(config_from_dict(data))
    metrics = {w: [(m["loss"], m["grad_norm"]) for m in read_metrics(d / "metrics.jsonl")] for w, d in runs.items()}
    assert len(metrics["host"]) == 4 and metrics["host"] == metrics["device"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tied_table_stays_on_the_device():
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert is_tied(model)
    with pytest.raises(ValueError, match="tied"):
        keep_embeddings_on_host(model)
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert not is_tied(untied)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_the_estimate_drops_exactly_the_table(stage):
    """On a GPU, auto keeps an untied table (Llama-3.1-8B: 128256 x 4096 bf16) in host memory: every stage's
    prediction is lower by its bytes; a tied one (Qwen2.5-0.5B) and a compiled decode step change nothing."""

    def allocated(shape: str, embeddings: str, **ppo) -> int:
        cfg = config_from_dict({"model": {"embeddings": embeddings}, "ppo": ppo})
        return estimate_stage(cfg, resolve_shape(shape)[0], stage).allocated

    table = rounded(128_256 * 4096 * 2)
    assert allocated("llama-3.1-8b", "device") - allocated("llama-3.1-8b", "auto") == table
    assert allocated("llama-3.1-8b", "host") == allocated("llama-3.1-8b", "auto")
    assert allocated("qwen2.5-0.5b", "device") == allocated("qwen2.5-0.5b", "auto")
    if stage == "ppo":
        compiled = {"generation_cache": "static", "compile_generation": True}
        assert allocated("llama-3.1-8b", "auto", **compiled) == allocated("llama-3.1-8b", "device", **compiled)
