"""Names under `builtin:`: models and data files that packages bundle, registered by plugins, looked up lazily.

`builtin:NAME` is a model: the local folder its builder returns (built on first use), plus, optionally,
its architecture (a config.json-style dict) so `estimate` sizes it without building it.
`builtin:NAME/FILE` is a data file in the folder registered as NAME's data.

A package registers names through the entry-point group `lowmem_rlhf.builtins`, e.g. in its
pyproject.toml::

    [project.entry-points."lowmem_rlhf.builtins"]
    mytask = "mytask.plugin:register"    # register() calls register_model / register_data

Every provider is called once, on the first lookup of a `builtin:` name. The bundled tiny task
(lowmem_rlhf/tiny/builtins.py) and SmolLM2-135M-Instruct (lowmem_rlhf/smollm2/builtins.py) register
themselves this way; they are also named in BUNDLED, so that a
checkout whose installed metadata predates the entry point (an editable install not reinstalled since
it was added) still finds it. This module is at the bottom layer: it imports no other part of the
package but `errors`, and nothing here imports a provider by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lowmem_rlhf.errors import UserError

PREFIX = "builtin:"
ENTRY_POINT_GROUP = "lowmem_rlhf.builtins"
# the same values as pyproject.toml's entry points
BUNDLED = ("lowmem_rlhf.tiny.builtins:register", "lowmem_rlhf.smollm2.builtins:register")


@dataclass(frozen=True)
class BuiltinModel:
    build: Callable[[], str | Path]  # returns the model's local folder, building it if needed
    shape: Callable[[], dict] | None = None  # its config.json-style architecture, without building it


_models: dict[str, BuiltinModel] = {}
_data: dict[str, Callable[[], Path]] = {}
_loaded: list[str] = []  # providers called so far


def register_model(name: str, build: Callable[[], str | Path], shape: Callable[[], dict] | None = None) -> None:
    """Make `builtin:<name>` load the folder `build()` returns; `shape()` sizes it for `estimate`."""
    _models[name] = BuiltinModel(build, shape)


def register_data(name: str, folder: Callable[[], Path]) -> None:
    """Make `builtin:<name>/<file>` read <file> from the folder `folder()` returns."""
    _data[name] = folder


def providers() -> list[str]:
    """The `module:function` of every provider: BUNDLED, then the installed entry points, each once."""
    found = [ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys([*BUNDLED, *found]))


def _load() -> None:
    for spec in providers():
        if spec in _loaded:
            continue
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)()
        _loaded.append(spec)


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def _names(table: dict) -> str:
    return ", ".join(repr(PREFIX + k) for k in sorted(table)) or "none"


def _model(name: str) -> BuiltinModel:
    _load()
    entry = _models.get(name.removeprefix(PREFIX))
    if entry is None:
        raise UserError(f"model.name_or_path: unknown builtin model {name!r}; registered: {_names(_models)}")
    return entry


def model_path(name: str) -> str:
    """The local folder of the model `builtin:<name>`, built on first use."""
    return str(_model(name).build())


def model_shape(name: str) -> dict | None:
    """The registered architecture of `builtin:<name>`, or None when it registered none."""
    shape = _model(name).shape
    return shape() if shape is not None else None


def data_file(source: str) -> Path:
    """The file `builtin:<name>/<file>` names; a clear error for an unknown name or a missing file."""
    _load()
    name, _, file = source.removeprefix(PREFIX).partition("/")
    folder = _data.get(name)
    if folder is None:
        raise UserError(f"unknown bundled data {source!r}; registered data: {_names(_data)} (as builtin:NAME/FILE)")
    root = Path(folder())
    path = root / file
    if not file or not path.is_file():
        files = ", ".join(sorted(p.name for p in root.iterdir() if p.is_file())) or "no files"
        raise UserError(f"bundled data {source!r} does not exist; {PREFIX}{name} has {files}")
    return path
