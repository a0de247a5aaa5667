"""What every stage shares: the run folder, its config.yaml and manifest.json, seeding."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowmem_rlhf.config import RecipeConfig, config_from_dict, config_to_dict, dump_yaml, read_recipe
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.train.io import atomic_write_json, atomic_write_text
from lowmem_rlhf.train.loop import fingerprint

logger = logging.getLogger(__name__)

# Stage name (recipe key, CLI command) -> its folder in output_dir.
STAGE_DIRS = {"sft": "sft", "rm": "reward", "ppo": "ppo", "dpo": "dpo", "compare": "compare"}
# The base model's identity and loading settings, beside config.yaml in output_dir.
BASE_MODEL_FILE = "base_model.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def stage_settings(cfg: RecipeConfig, stage: str) -> dict:
    """The settings a stage's result depends on (a change means its checkpoints no longer apply)."""
    d = config_to_dict(cfg)
    return {"seed": d["seed"], "model": d["model"], "lora": d["lora"], stage: d[stage]}


class Manifest:
    """`output_dir/manifest.json`: which stages finished, when, and under which settings."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "manifest.json"
        try:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        except json.JSONDecodeError:
            raise UserError(f"{self.path} is corrupt; delete it to re-run every stage") from None

    def finished(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def mark_finished(self, stage: str, info: dict) -> None:
        self.data["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_json(self.path, self.data)

    def forget(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            atomic_write_json(self.path, self.data)


def read_run(run_dir: str | Path) -> tuple[Path, RecipeConfig]:
    """(run_dir, resolved config) of a finished or running pipeline folder."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass the output_dir of a run")
    return run, config_from_dict(read_recipe(cfg_path), where=str(cfg_path))


def finished_stage_dir(cfg: RecipeConfig, stage: str, needed_by: str) -> tuple[Path, dict]:
    """The folder of a stage this one builds on, with its manifest entry; an error if it has not finished."""
    done = Manifest(Path(cfg.output_dir)).finished(stage)
    if done is None:
        raise UserError(
            f"{needed_by} needs the finished {stage} stage of this run, but {Path(cfg.output_dir) / STAGE_DIRS[stage]} "
            f"has none; list `{stage}` before `{needed_by}` in `stages` (or run `lowmem-rlhf {stage}` first)"
        )
    return Path(cfg.output_dir) / STAGE_DIRS[stage], done


def base_model_info(cfg: RecipeConfig) -> dict:
    """What `base_model.json` records: the base's id, revision, local folder and how it was loaded."""
    from lowmem_rlhf.builtins import is_builtin
    from lowmem_rlhf.model.loading import quantization_config, resolve_device, resolve_dtype, resolve_path

    mc = cfg.model
    path = resolve_path(mc)
    dtype = resolve_dtype(mc.compute_dtype, resolve_device(mc.device))
    local = Path(path).resolve() if is_builtin(mc.name_or_path) or Path(path).is_dir() else None
    bnb = quantization_config(mc, dtype)
    return {
        "name_or_path": mc.name_or_path,
        "revision": mc.revision,
        "local_path": str(local) if local is not None else None,
        "quantization": mc.quantization,
        "double_quant": mc.double_quant,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization_config": bnb.to_dict() if bnb is not None else None,
        "trust_remote_code": mc.trust_remote_code,
    }


def describe_run(cfg: RecipeConfig, out: Path) -> None:
    """Save the tokenizer (pad token and chat template set) and `base_model.json` into `out`.

    With them the run folder describes itself: `AutoTokenizer.from_pretrained(out)` gives the exact
    tokenizer every stage used, and `export` knows which base (and quantization) the adapters belong to.
    """
    from lowmem_rlhf.model.loading import load_tokenizer

    info = base_model_info(cfg)
    tokenizer = load_tokenizer(cfg.model, info["local_path"] or cfg.model.name_or_path)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    atomic_write_json(out / BASE_MODEL_FILE, info)


def begin_stage(cfg: RecipeConfig, stage: str, force: bool) -> tuple[Path, Manifest, bool]:
    """Prepare `output_dir/<stage>`; returns (stage_dir, manifest, already_finished).

    A finished stage is skipped unless forced; a stage killed half-way keeps its checkpoints and
    resumes from them; `force` wipes the stage folder first.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    describe_run(cfg, out)
    manifest = Manifest(out)
    stage_dir = out / STAGE_DIRS[stage]
    done = manifest.finished(stage)
    if done and not force:
        if done.get("settings") != fingerprint(stage_settings(cfg, stage)):
            logger.warning(
                "%s: finished earlier with different settings; keeping that result (re-run with --force to redo it)",
                stage,
            )
        logger.info("%s: already finished in %s; skipping (use --force to run it again)", stage, stage_dir)
        return stage_dir, manifest, True
    if force:
        manifest.forget(stage)
        shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return stage_dir, manifest, False
