"""The CUDA 4-bit path (runs only where a GPU exists): bf16 compute, paged 8-bit AdamW, real kernels."""

import pytest
import torch
from conftest import base_fingerprint

from lowmem_rlhf.config import LoRAConfig, ModelConfig, SFTConfig
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.forward import token_logprobs
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.train.runner import build_optimizer

pytestmark = pytest.mark.gpu


def test_cuda_nf4_training_step(tiny_path):
    model, _ = load_base(ModelConfig(device="cuda"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # auto = bf16 on CUDA, not upcast
    bank = AdapterBank(model)
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=8)), trainable=True)
    opt = build_optimizer(bank.trainable_parameters(), SFTConfig(), torch.device("cuda"))
    assert type(opt).__name__ == "PagedAdamW8bit"
    before, base = bank.state_dict("policy"), base_fingerprint(bank.peft_model)
    ids = torch.randint(10, 200, (4, 32), device="cuda")
    losses = []
    for _ in range(5):
        with bank.use("policy", train=True) as m:
            loss = -token_logprobs(m, ids, torch.ones_like(ids)).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert base_fingerprint(bank.peft_model) == base
    after = bank.state_dict("policy")
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_the_input_table_in_host_memory_on_cuda(tiny_path):
    """model.embeddings: host on a GPU: the table leaves the allocated memory, the model still reports the GPU
    and the compute dtype, and logits and greedy generations equal those with the table on the device."""
    start = torch.cuda.memory_allocated()
    on_device, _ = load_base(ModelConfig(device="cuda", embeddings="device"))
    device_bytes = torch.cuda.memory_allocated() - start
    start = torch.cuda.memory_allocated()
    on_host, _ = load_base(ModelConfig(device="cuda", embeddings="host"))
    host_bytes = torch.cuda.memory_allocated() - start
    table = on_host.get_input_embeddings().weight
    assert table.device.type == "cpu"
    assert device_bytes - host_bytes == table.numel() * table.element_size()
    assert (on_host.device.type, on_host.dtype) == ("cuda", on_device.dtype)
    ids = torch.randint(10, 200, (2, 24), device="cuda")
    with torch.no_grad():
        assert torch.equal(on_host(ids).logits, on_device(ids).logits)
    outs = [m.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in (on_device, on_host)]
    assert outs[1].device.type == "cuda" and torch.equal(*outs)
