"""`builtin:` models and data come from plugins (entry points), the bundled tiny task being one of them."""

import json
import subprocess
import sys
from importlib import metadata

import pytest
import tomllib
from conftest import REPO

from lowmem_rlhf import builtins
from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import resolve_path
from lowmem_rlhf.model.memory import resolve_shape


def test_pyproject_declares_the_bundled_providers():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = data["project"]["entry-points"][builtins.ENTRY_POINT_GROUP]
    assert tuple(declared.values()) == builtins.BUNDLED  # the fallback for installs that predate the entry point


def test_a_plugin_registers_models_and_data_through_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "my_plugin.py").write_text(
        "from pathlib import Path\n"
        "from lowmem_rlhf.builtins import register_data, register_model\n"
        "HERE = Path(__file__).parent\n"
        "def register():\n"
        "    register_model('mine', lambda: HERE / 'mymodel', lambda: SHAPE)\n"
        "    register_data('mine', lambda: HERE / 'data')\n"
        "SHAPE = {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,\n"
        "         'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 1000}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    point = metadata.EntryPoint("mine", "my_plugin:register", builtins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(builtins.metadata, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(builtins, "_models", {})
    monkeypatch.setattr(builtins, "_data", {})
    monkeypatch.setattr(builtins, "_loaded", [])

    rows, where = load_rows("builtin:mine/rows.jsonl")
    assert rows == [{"prompt": "hi"}] and where == str(tmp_path / "data" / "rows.jsonl")
    assert resolve_path(ModelConfig(name_or_path="builtin:mine")) == str(tmp_path / "mymodel")
    shape, source = resolve_shape("builtin:mine")
    assert (shape.hidden, shape.layers, shape.vocab) == (64, 2, 1000) and source == "the bundled model builtin:mine"
    assert builtins._loaded == [*builtins.BUNDLED, "my_plugin:register"]  # each called once
    # the bundled task registered itself through the same door
    assert len(load_rows("builtin:tiny/prompts.jsonl")[0]) > 0
    unknown = (
        r"unknown builtin model 'builtin:huge'; registered: 'builtin:mine', 'builtin:smollm2-135m', 'builtin:tiny'"
    )
    with pytest.raises(UserError, match=unknown):
        resolve_path(ModelConfig(name_or_path="builtin:huge"))
    unknown = r"unknown bundled data 'builtin:other/x.jsonl'; registered data: 'builtin:mine', 'builtin:tiny'"
    with pytest.raises(UserError, match=unknown):
        load_rows("builtin:other/x.jsonl")
    missing = r"bundled data 'builtin:mine/none.jsonl' does not exist; builtin:mine has rows.jsonl$"
    with pytest.raises(UserError, match=missing):
        load_rows("builtin:mine/none.jsonl")


def test_the_bundled_task_loads_only_on_the_first_builtin_lookup():
    code = (
        "import sys\n"
        "from lowmem_rlhf.data.formats import resolve_source\n"
        "from lowmem_rlhf.model.memory import resolve_shape\n"
        "import lowmem_rlhf.model.loading, lowmem_rlhf.stages.ppo, lowmem_rlhf.cli\n"
        "assert not [m for m in sys.modules if m.startswith('lowmem_rlhf.tiny')], 'imported before use'\n"
        "assert resolve_source('builtin:tiny/sft.jsonl').name == 'sft.jsonl'\n"
        "assert resolve_shape('builtin:tiny')[0].layers >= 1\n"
        "assert 'lowmem_rlhf.tiny.builtins' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
