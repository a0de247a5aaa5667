"""Read rows from JSONL/JSON/CSV/Parquet files, bundled data (`builtin:<name>/<file>`) or a Hub dataset."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lowmem_rlhf.builtins import data_file, is_builtin
from lowmem_rlhf.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def resolve_source(source: str) -> Path | None:
    """A local path for `source`, or None when it should be read as a Hub dataset id."""
    if is_builtin(source):
        return data_file(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(f"data file {source} not found (relative paths are read from {Path.cwd()})")
    return None


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped); other bytes are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    # split on "\n" only: JSON strings may hold other line separators (U+2028) unescaped
    for i, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {i}: invalid JSON ({e.msg}); each line must be one JSON object") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        hint = "; it looks like JSON Lines (one object per line): rename it to .jsonl" if e.msg == "Extra data" else ""
        raise UserError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}){hint}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f'{path}: expected a JSON list of rows (or {{"data": [...]}})')
    return data


def _read_csv(path: Path) -> list[dict]:
    try:
        return [dict(r) for r in csv.DictReader(io.StringIO(_read_text(path), newline=""))]
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _check_format(path: Path) -> None:
    """An error when the first bytes show another format than the extension claims (say which, and the fix)."""
    with path.open("rb") as f:
        head = f.read(64)
    is_parquet = head.startswith(b"PAR1")
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if path.suffix == ".parquet" and not is_parquet:
        looks = " (it looks like JSON)" if text.startswith((b"{", b"[")) else ""
        raise UserError(
            f"data file {path} is not a Parquet file{looks}; give the extension of its real format: "
            ".jsonl, .json or .csv"
        )
    if path.suffix != ".parquet" and is_parquet:
        raise UserError(f"data file {path} is a Parquet file; rename it to .parquet")
    if path.suffix == ".jsonl" and text.startswith(b"["):
        raise UserError(f"data file {path} holds a JSON list, not JSON Lines; rename it to .json")
    if path.suffix == ".csv" and text.startswith((b"{", b"[")):
        raise UserError(f"data file {path} holds JSON, not CSV; rename it to .jsonl (one object per line) or .json")


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
    _check_format(path)
    rows = reader(path)
    if not rows:
        raise UserError(f"data file {path} has no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return rows, str(path)


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    from lowmem_rlhf.data.hub import OFFLINE, hub_unreachable

    why = OFFLINE if datasets.config.HF_HUB_OFFLINE else hub_unreachable()  # HF_DATASETS_OFFLINE counts too
    if why is not None and why != OFFLINE:
        raise UserError(
            f"data {name!r} is not a local file and the Hub cannot be reached: {why}; check the path, or the "
            "network (HF_HUB_OFFLINE=1 uses a copy in the local cache)"
        )
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable dataset id"
        if why == OFFLINE:
            raise UserError(
                f"data {name!r} (split {split!r}) is not a local file and not in the local Hub cache, and "
                "HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set; give a local file, or run once online to cache it"
            ) from None
        raise UserError(
            f"data {name!r} is neither a local file nor a loadable Hub dataset (split {split!r}): {e}".splitlines()[0]
        ) from None
    return [dict(r) for r in ds]
