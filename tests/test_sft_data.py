"""SFT data: formats, prompt masking, the closing EOS as a label, truncation, bad rows."""

import json

import pytest

from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.data.chat import encode_prompt
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.sft import collate_sft, normalize_sft_row, tokenize_sft, truncate
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(ModelConfig())


def test_three_formats_render_the_same_prompt(tok):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "2 plus 3 is 5."},
            ]
        },
        {"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
        {"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
    ]
    examples, truncated = tokenize_sft(rows, tok, 128, "mem")
    assert truncated == 0
    assert examples[0] == examples[1] == examples[2]


def test_prompt_tokens_are_not_labels_and_closing_eos_is(tok):
    (ex,), _ = tokenize_sft([{"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."}], tok, 128, "mem")
    prompt_ids = encode_prompt(tok, [{"role": "user", "content": "What is 2 plus 3?"}])
    assert ex.input_ids[: ex.prompt_len] == prompt_ids
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[ex.prompt_len : -1]) == "2 plus 3 is 5."
    batch = collate_sft([ex], tok.pad_token_id)
    labels = batch["input_ids"][batch["response_mask"]].tolist()
    assert labels == ex.input_ids[ex.prompt_len :]
    assert labels[-1] == tok.eos_token_id
    assert not batch["response_mask"][0, : ex.prompt_len].any()


def test_pad_equal_to_eos_keeps_eos_label(tok):
    short, _ = tokenize_sft([{"prompt": "Hi", "completion": "Yes."}], tok, 64, "m")
    long, _ = tokenize_sft([{"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."}], tok, 64, "m")
    batch = collate_sft(short + long, pad_id=tok.eos_token_id)
    for i, ex in enumerate(short + long):
        n = len(ex.input_ids)
        assert batch["response_mask"][i].sum() == n - ex.prompt_len
        assert batch["response_mask"][i, n - 1]  # the EOS label survives pad == eos
        assert not batch["response_mask"][i, n:].any()


def test_truncation_policy():
    prompt, response = list(range(100, 140)), [1, 2, 3, 99]
    p, r = truncate(prompt, response, 20)
    assert r == response and p == prompt[-16:]  # prompt cut from the left, response and EOS kept
    p, r = truncate(list(range(10)), list(range(50)), 20)
    assert p == list(range(10)) and r == list(range(10))  # prompt keeps half; response cut, EOS lost
    assert truncate([1, 2], [3], 20) == ([1, 2], [3])


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "hi"}, "missing field `completion`"),
        ({"completion": "x"}, "missing field `prompt`"),
        ({"prompt": "hi", "completion": ""}, "`completion` must be non-empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "`messages[0]` must be a message"),
        ({"instruction": "do"}, "missing field `output`"),
        ({"text": "hello"}, "no SFT fields found"),
    ],
)
def test_bad_rows_name_file_row_and_field(row, needle):
    with pytest.raises(UserError) as e:
        normalize_sft_row(row, "data.jsonl, row 7")
    assert "data.jsonl, row 7" in str(e.value) and needle in str(e.value)


def test_file_formats_load_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a?", "completion": "b."}, {"prompt": "c?", "completion": "d."}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na?,b.\nc?,d.\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "csv", "parquet"):
        got, _ = load_rows(str(tmp_path / f"d.{ext}"))
        assert got == rows, ext


def test_file_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported extension"):
        load_rows(str(tmp_path / "x.txt"))
    with pytest.raises(UserError, match="bundled data"):
        load_rows("builtin:tiny/nope.jsonl")
