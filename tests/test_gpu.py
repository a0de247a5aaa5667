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
