"""Resumable checkpoints: role weights (LoRA + heads), optimizer, scheduler, RNG and loop state.

A checkpoint folder exists under its final name only once it is complete (written to a temporary
folder, then renamed), so a kill at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.train.io import atomic_write_json


class Checkpointer:
    """`root/step-NNNNNNN/` folders, the newest `keep` kept; refuses checkpoints of other settings."""

    def __init__(self, root: Path, keep: int, fingerprint: str, name: str):
        self.root, self.keep, self.fingerprint, self.name = Path(root), max(keep, 1), fingerprint, name

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, *, bank, roles: list[str], optimizer, scheduler, extra: dict | None = None) -> Path:
        final = self.root / f"step-{step:07d}"
        if final.exists():
            return final
        tmp = self.root / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "roles": {r: bank.state_dict(r) for r in roles},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": {
                    "python": random.getstate(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "extra": extra or {},
            },
            tmp / "state.pt",
        )
        atomic_write_json(tmp / "state.json", {"step": step, "fingerprint": self.fingerprint})
        tmp.rename(final)
        for old in self.all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, *, bank, roles: list[str], optimizer, scheduler) -> tuple[int, dict[str, Any]]:
        info = json.loads((path / "state.json").read_text())
        if info["fingerprint"] != self.fingerprint:
            raise UserError(
                f"{path} was made with different {self.name} settings than this recipe; re-run with --force to "
                "start the stage over, or use another output_dir"
            )
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        for r in roles:
            bank.load_state_dict(r, state["roles"][r])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return int(info["step"]), state["extra"]
