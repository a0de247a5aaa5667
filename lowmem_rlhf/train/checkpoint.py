"""Resumable checkpoints: role weights (LoRA + heads), optimizer, scheduler, RNG and loop state.

A checkpoint folder holds no pickle, so a file someone put in a run folder is never executed:
`tensors.safetensors` has every tensor (role weights, optimizer state tensors, torch RNG states) and
`trainer_state.json` the plain state (optimizer param groups and scalars, scheduler, Python RNG, the
loop's extras), with tensors referenced by name. `state.json` is written last and records the step,
the settings fingerprint and the sha256 of both files, so a truncated or corrupt checkpoint is
detected and the next older one is used.

A checkpoint folder exists under its final name only once it is complete (written to a temporary
folder, then renamed), so a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.heads import check_finite
from lowmem_rlhf.train.io import atomic_write_json

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
PLAIN_FILE = "trainer_state.json"
# 1 was a pickled state.pt, which is never read; 2 held scalar heads with a bias and reward-model data
# cursors counted in pairs; 3: bias-free heads, reward-model micro-batches of whole rows
FORMAT = 3

_reported: set[str] = set()  # unusable checkpoints already warned about (one line each per process)


# ---------------------------------------------------------------------------------------------------- encoding


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-able form of a state tree; each tensor goes to `tensors[key-path]` and is replaced by its key."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode_state(k, tensors, f"{key}/k{i}"), encode_state(v, tensors, f"{key}/{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"checkpoint state at {key!r} has a {type(obj).__name__}, which has no safe encoding")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    return obj


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """`root/step-NNNNNNN/` folders, the newest `keep` kept; refuses checkpoints of other settings."""

    def __init__(self, root: Path, keep: int, fingerprint: str, name: str):
        self.root, self.keep, self.fingerprint, self.name = Path(root), max(keep, 1), fingerprint, name

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())

    @staticmethod
    def problem(path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be used (None when every file matches its recorded checksum)."""
        try:
            info = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{STATE_FILE} is unreadable"
        if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
            return "it has no checksums (an older, pickled format that is never loaded)"
        for name in (TENSORS_FILE, PLAIN_FILE):
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if sha256_file(f) != info["files"].get(name):
                return f"{name} does not match its checksum (truncated or corrupt)"
        return None

    def latest(self) -> Path | None:
        """The newest usable checkpoint; each unusable newer one is reported in one warning line."""
        found = self.all()
        for i in range(len(found) - 1, -1, -1):
            why = self.problem(found[i])
            if why is None:
                return found[i]
            if str(found[i]) not in _reported:
                _reported.add(str(found[i]))
                fallback = f"using {found[i - 1].name} instead" if i > 0 else "no older checkpoint, starting over"
                logger.warning("%s: checkpoint %s is unusable (%s); %s", self.name, found[i], why, fallback)
        return None

    def check(self, path: Path) -> int:
        """The step of `path`; a UserError when it was made under other settings."""
        info = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise UserError(
                f"{path} was written by an earlier version of lowmem-rlhf (checkpoint format {info.get('format')}; "
                f"this version resumes format {FORMAT}: bias-free heads, reward batches of whole rows); re-run with "
                "--force to start the stage over, or use another output_dir"
            )
        if info["fingerprint"] != self.fingerprint:
            raise UserError(
                f"{path} was made with different {self.name} settings than this recipe; re-run with --force to "
                "start the stage over, or use another output_dir"
            )
        return int(info["step"])

    def save(self, step: int, *, bank, roles: list[str], optimizer, scheduler, extra: dict | None = None) -> Path:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        final = self.root / f"step-{step:07d}"
        if final.exists() and self.problem(final) is None:
            return final
        tensors: dict[str, torch.Tensor] = {}
        weights = {f"roles/{r}/{n}": t for r in roles for n, t in bank.state_dict(r).items()}
        check_finite(weights, f"the {self.name} checkpoint of step {step}")
        tensors.update(weights)
        plain = {
            "optimizer": encode_state(optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {
                "python": encode_state(random.getstate(), tensors, "rng/python"),
                "torch": encode_state(torch.get_rng_state(), tensors, "rng/torch"),
                "cuda": encode_state(torch.cuda.get_rng_state_all(), tensors, "rng/cuda")
                if torch.cuda.is_available()
                else None,
            },
            "extra": extra or {},
        }
        plain["scheduler"] = encode_state(plain["scheduler"], tensors, "scheduler")
        plain["extra"] = encode_state(plain["extra"], tensors, "extra")
        tmp = self.root / f".tmp-step-{step:07d}"
        try:
            # half-written folders of a process killed while saving (the run folder's lock makes them ours)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / TENSORS_FILE))
            (tmp / PLAIN_FILE).write_text(json.dumps(plain, allow_nan=False), encoding="utf-8")
            for name in (TENSORS_FILE, PLAIN_FILE):
                _fsync(tmp / name)
            files = {name: sha256_file(tmp / name) for name in (TENSORS_FILE, PLAIN_FILE)}
            atomic_write_json(
                tmp / STATE_FILE, {"format": FORMAT, "step": step, "fingerprint": self.fingerprint, "files": files}
            )
            shutil.rmtree(final, ignore_errors=True)  # an unusable folder of the same step
            tmp.rename(final)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # safetensors reports the OS error in its message only: "... (os error 28)"
            if getattr(e, "errno", None) != errno.ENOSPC and f"os error {errno.ENOSPC})" not in str(e):
                raise
            previous = self.latest()
            kept = f"the previous checkpoint {previous} is kept" if previous else "there is no earlier checkpoint"
            raise UserError(
                f"{self.name}: no space left on the device of {self.root} while saving the checkpoint of step {step}; "
                f"the partial checkpoint was removed and {kept}. Free disk space (or lower save_total_limit) and "
                "re-run the same command to resume"
            ) from None
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, *, bank, roles: list[str], optimizer, scheduler) -> tuple[int, dict[str, Any]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        step = self.check(path)
        try:
            tensors = load_file(str(path / TENSORS_FILE))
            plain = json.loads((path / PLAIN_FILE).read_text(encoding="utf-8"))
        except (SafetensorError, ValueError) as e:  # files that match their checksums yet do not parse
            raise UserError(
                f"checkpoint {path} is unreadable ({e}); delete that folder to resume from an older checkpoint, "
                "or re-run with --force"
            ) from None
        for r in roles:
            prefix = f"roles/{r}/"
            bank.load_state_dict(r, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer.load_state_dict(decode_state(plain["optimizer"], tensors))
        if scheduler is not None:
            scheduler.load_state_dict(decode_state(plain["scheduler"], tensors))
        rng = plain["rng"]
        random.setstate(decode_state(rng["python"], tensors))
        torch.set_rng_state(decode_state(rng["torch"], tensors))
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(decode_state(rng["cuda"], tensors))
        return step, decode_state(plain["extra"], tensors)
