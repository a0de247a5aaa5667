"""AdapterBank on the real 4-bit tiny model: pitfalls 2, 8, 9, 10 and 11."""

from unittest import mock

import pytest
import torch
from conftest import base_fingerprint

from lowmem_rlhf.config import LoRAConfig, ModelConfig
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.forward import position_ids_from_mask, token_logprobs
from lowmem_rlhf.model.heads import HEAD_FILE
from lowmem_rlhf.model.loading import load_base


@pytest.fixture
def loaded(tiny_path):
    return load_base(ModelConfig(device="cpu"))


@pytest.fixture
def bank(loaded):
    model, _ = loaded
    torch.manual_seed(0)
    b = AdapterBank(model)
    cfg = lora_config(LoRAConfig(r=4, alpha=8, dropout=0.0))
    b.add_role("policy", lora=cfg, trainable=True)
    with torch.no_grad():  # a non-zero B so copies and switches are observable in outputs
        for p in b.role_parameters("policy"):
            p.normal_(0, 0.2)
    b.add_role("reference", copy_of="policy")
    b.add_role("reward", lora=cfg, head=True)
    return b


def flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def trainable_roles(bank):
    return {n.split(".")[-2] for n, p in bank.peft_model.named_parameters() if p.requires_grad}


def test_base_is_real_nf4_and_not_upcast(tiny_path):
    import bitsandbytes as bnb

    model, _ = load_base(ModelConfig(device="cpu", compute_dtype="bfloat16"))
    AdapterBank(model).add_role("policy", lora=lora_config(LoRAConfig(r=4)), trainable=True)
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    assert q.weight.quant_state.quant_type == "nf4"
    # pitfall 10: embeddings, norms and lm_head stay in the compute dtype
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_only_trainable_roles_reach_the_optimizer(bank):
    params = {id(p) for p in bank.trainable_parameters()}
    assert params == {id(p) for p in bank.role_parameters("policy")}
    assert trainable_roles(bank) == {"policy"}


def test_use_keeps_bank_flags_despite_peft_set_adapter(bank):
    before = flags(bank.peft_model)
    with bank.use("reward") as m:
        # peft's set_adapter would make reward trainable and freeze policy; the bank undoes that
        assert m.active_adapter == "reward"
        assert trainable_roles(bank) == {"policy"}
        assert not m.training
    assert flags(bank.peft_model) == before
    assert bank.peft_model.active_adapter == "policy"


def test_use_restores_everything_when_body_raises(bank):
    before_flags = flags(bank.peft_model)
    before_modes = {n: m.training for n, m in bank.peft_model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with bank.use("reward", train=True) as m:
            assert m.training
            for p in bank.role_parameters("reward"):
                p.requires_grad_(True)  # a body that messes with flags
            raise RuntimeError("boom")
    assert flags(bank.peft_model) == before_flags
    assert {n: m.training for n, m in bank.peft_model.named_modules()} == before_modes
    assert bank.peft_model.active_adapter == "policy"


def test_roles_give_different_outputs_and_copies_agree(bank):
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    mask = torch.ones_like(ids)
    out = {}
    for role in ("policy", "reference", "reward", None):
        with torch.no_grad(), bank.use(role) as m:
            out[role] = token_logprobs(m, ids, mask)
    assert torch.equal(out["policy"], out["reference"])  # a copy is exact
    assert not torch.allclose(out["policy"], out[None])  # non-zero adapter vs the raw base
    assert not torch.allclose(out["reward"], out["policy"])


def test_frozen_roles_and_base_unchanged_by_training(bank):
    base_before = base_fingerprint(bank.peft_model)
    ref_before, reward_before = bank.state_dict("reference"), bank.state_dict("reward")
    policy_before = bank.state_dict("policy")
    opt = torch.optim.AdamW(bank.trainable_parameters(), lr=1e-2)
    ids = torch.randint(10, 200, (2, 12))
    for _ in range(3):
        with bank.use("policy", train=True) as m:
            loss = -token_logprobs(m, ids, torch.ones_like(ids)).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert base_fingerprint(bank.peft_model) == base_before
    for name, before in (("reference", ref_before), ("reward", reward_before)):
        after = bank.state_dict(name)
        assert all(torch.equal(after[k], v) for k, v in before.items()), name
    after = bank.state_dict("policy")
    changed = [k for k, v in policy_before.items() if not torch.equal(after[k], v)]
    assert len(changed) == len(policy_before)  # every trainable tensor moved
    # pitfall 9: training with gradient checkpointing leaves the config (which export saves) and generation
    # on the KV cache
    assert bank.base_model.config.use_cache is True
    with torch.no_grad(), bank.use("policy") as m:
        out = m.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() >= 6


def test_eval_forward_does_not_break_later_gradients(bank):
    """An eval-mode pass (rollout, scoring) must not change how the 4-bit base backpropagates."""
    ids = torch.randint(10, 200, (2, 12))

    def grads():
        with bank.use("policy", train=True) as m:
            (-token_logprobs(m, ids, torch.ones_like(ids)).mean()).backward()
        out = [p.grad.clone() for p in bank.role_parameters("policy")]
        for p in bank.role_parameters("policy"):
            p.grad = None
        return out

    torch.manual_seed(0)
    before = grads()
    with torch.no_grad(), bank.use("policy") as m:
        token_logprobs(m, ids, torch.ones_like(ids))
    torch.manual_seed(0)
    after = grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(g.abs().sum() > 0 for g in after)  # layer 0's LoRA gets gradient through the 4-bit layers above


def test_head_and_adapter_round_trip_bit_exact(bank, loaded, tmp_path, tiny_path):
    from peft import PeftModel

    with torch.no_grad():
        bank.head("reward").linear.weight.normal_()
    out = bank.save_role("reward", tmp_path / "reward")
    assert (out / "adapter_config.json").is_file() and (out / HEAD_FILE).is_file()

    model2, _ = load_base(ModelConfig(device="cpu"))
    bank2 = AdapterBank(model2)
    bank2.add_role("reward", from_dir=out, head=True)
    for k, v in bank.state_dict("reward").items():
        assert torch.equal(bank2.state_dict("reward")[k], v), k
    assert bank2.head("reward").linear.weight.dtype == torch.float32

    # standard PEFT layout: loadable on its own
    model3, _ = load_base(ModelConfig(device="cpu"))
    plain = PeftModel.from_pretrained(model3, str(out))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad(), bank.use("reward") as m:
        expected = m(input_ids=ids).logits
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)

    (out / HEAD_FILE).unlink()
    bank3 = AdapterBank(load_base(ModelConfig(device="cpu"))[0])
    with pytest.raises(UserError, match="head.safetensors is missing"):
        bank3.add_role("reward", from_dir=out, head=True)


def test_missing_adapter_dir_is_a_user_error(bank, tmp_path):
    with pytest.raises(UserError, match="no PEFT adapter"):
        bank.add_role("other", from_dir=tmp_path / "nothing")


@pytest.mark.parametrize("chunk", [1, 3, 8, 512])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_chunked_model_logprobs_equal_full_logits(bank, chunk, padding_side):
    rows = [[1, 30, 31, 32, 33, 34, 2], [1, 40, 41, 2]]
    width = max(map(len, rows))
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    with torch.no_grad(), bank.use("policy") as m:
        got = token_logprobs(m, ids, mask, chunk_size=chunk)
        logits = m(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)
    # Padding side and batching do not change a row's numbers beyond float reassociation: the 4-bit
    # CPU matmul sums in a different order for another batch shape (observed up to ~5e-4 in a log-prob).
    for i, r in enumerate(rows):
        alone = torch.tensor([r])
        with torch.no_grad(), bank.use("policy") as m:
            single = token_logprobs(m, alone, torch.ones_like(alone), chunk_size=chunk)[0]
        torch.testing.assert_close(got[i][valid[i]], single, atol=2e-3, rtol=0)


def test_flash_attention_without_gpu_or_package_is_a_clear_error(tiny_path):
    with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU; use sdpa"):
        load_base(ModelConfig(device="cpu", attn_implementation="flash_attention_2"))


def test_cuda_request_without_gpu_is_a_clear_error(tiny_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        load_base(ModelConfig(device="cuda"))


def _lean_bank(dtype: str):
    from peft.tuners.lora.bnb import Linear4bit

    model, _ = load_base(ModelConfig(device="cpu", compute_dtype=dtype))
    torch.manual_seed(0)
    bank = AdapterBank(model)
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=4, alpha=8, dropout=0.0)), trainable=True)
    params = bank.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    layers = [m for m in bank.peft_model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(type(m).__name__ == "LeanLoraLinear4bit" for m in layers)
    assert all(p.dtype == torch.float32 for p in params)  # the adapters stay fp32 master weights
    return bank, params, layers


def test_lean_4bit_lora_forward_equals_peft_in_fp32(tiny_path):
    """Every 4-bit LoRA layer computes LoRA in the compute dtype without copying the 4-bit output
    (lowmem_rlhf.model.peft_4bit): in fp32 the log-probs and every LoRA gradient equal peft's own forward
    bit for bit."""
    from peft.tuners.lora.bnb import Linear4bit

    bank, params, layers = _lean_bank("float32")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 600, (3, 20), generator=g)
    mask = torch.ones_like(ids)

    def run():
        for p in params:
            p.grad = None
        with bank.use("policy", train=True) as m:
            lp = token_logprobs(m, ids, mask)
            lp.sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    lean = run()
    with mock.patch.object(type(layers[0]), "forward", Linear4bit.forward):
        peft = run()
    assert torch.equal(lean[0], peft[0])
    assert all(torch.equal(a, b) for a, b in zip(lean[1], peft[1], strict=True))


def test_lean_4bit_lora_forward_in_bf16_rounds_only_the_lora_product(tiny_path):
    """In bf16 the LoRA product is rounded to bf16 after each of its two matmuls instead of computed in fp32
    and rounded once: one layer's output moves by at most a few bf16 steps (2^-8 relative) of the LoRA
    output, and the LoRA weights' gradients by about 1% (bf16 gradient matmuls)."""
    from peft.tuners.lora.bnb import Linear4bit

    _, params, layers = _lean_bank("bfloat16")
    layer = layers[0]
    x = torch.randn(4, 7, layer.in_features, generator=torch.Generator().manual_seed(2)).bfloat16()
    weights = [layer.lora_A["policy"].weight, layer.lora_B["policy"].weight]

    def run(forward):
        for w in weights:
            w.grad = None
        xi = x.clone().requires_grad_(True)
        out = forward(layer, xi)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach().float(), xi.grad.float(), [w.grad.clone() for w in weights]

    lean, peft = run(type(layer).forward), run(Linear4bit.forward)
    with torch.no_grad():
        lora_out = (x.float() @ weights[0].T @ weights[1].T) * layer.scaling["policy"]
    assert 0 < (lean[0] - peft[0]).abs().max() <= 4 * 2**-8 * lora_out.abs().max() + 2**-8 * peft[0].abs().max()
    torch.testing.assert_close(lean[1], peft[1], rtol=2**-6, atol=2**-6 * peft[1].abs().max().item())
    for a, b in zip(lean[2], peft[2], strict=True):
        assert torch.linalg.vector_norm(a - b) <= 0.02 * torch.linalg.vector_norm(b)


def test_a_second_all_linear_role_finds_the_same_layers_under_the_lean_forward(tiny_path):
    """peft resolves `all-linear` on a model that already has LoRA layers by their class name ("...Linear...");
    the lean 4-bit layer keeps such a name, so a second fresh role targets the same modules as the first."""
    model, _ = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model)
    assert LoRAConfig().target_modules == "all-linear"
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=4, alpha=8)), trainable=True)
    bank.add_role("reward", lora=lora_config(LoRAConfig(r=4, alpha=8)), head=True)
    targets = {n: set(c.target_modules) for n, c in bank.peft_model.peft_config.items()}
    assert targets["policy"] == targets["reward"] and len(targets["policy"]) == 7
