"""Read rows from JSONL/JSON/CSV/Parquet files, bundled data (`builtin:tiny/<file>`) or a Hub dataset."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from lowmem_rlhf.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def resolve_source(source: str) -> Path | None:
    """A local path for `source`, or None when it should be read as a Hub dataset id."""
    if source.startswith("builtin:tiny/"):
        path = Path(str(resources.files("lowmem_rlhf.tiny") / "data" / source.removeprefix("builtin:tiny/")))
        if not path.is_file():
            raise UserError(f"bundled data {source!r} does not exist; see lowmem_rlhf/tiny/data/ for the files")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"data file {source} not found (relative paths are read from {Path.cwd()})")
    return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}, line {i}: invalid JSON ({e.msg}); each line must be one JSON object"
                ) from None
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f'{path}: expected a JSON list of rows (or {{"data": [...]}})')
    return data


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_rows(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a data source as dicts, plus a display name for error messages ("file.jsonl")."""
    path = resolve_source(source)
    if path is None:
        return _load_hub(source, split), f"{source}[{split}]"
    if path.is_dir():
        raise UserError(f"data path {path} is a folder; give a .jsonl, .json, .csv or .parquet file")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix)
    if reader is None:
        raise UserError(f"data file {path}: unsupported extension {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    rows = reader(path)
    if not rows:
        raise UserError(f"data file {path} has no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return rows, str(path)


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable dataset id"
        raise UserError(
            f"data {name!r} is neither a local file nor a loadable Hub dataset (split {split!r}): {e}".splitlines()[0]
        ) from None
    return [dict(r) for r in ds]
