"""What every stage shares: the run folder, its config.yaml, manifest.json and lock, seeding."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from lowmem_rlhf import distributed
from lowmem_rlhf.config import ModelConfig, RecipeConfig, config_from_dict, config_to_dict, dump_yaml, read_recipe
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.train.checkpoint import Checkpointer
from lowmem_rlhf.train.io import atomic_write_json, atomic_write_text
from lowmem_rlhf.train.runner import fingerprint

logger = logging.getLogger(__name__)

# Stage name (recipe key, CLI command) -> its folder in output_dir.
STAGE_DIRS = {"sft": "sft", "rm": "reward", "ppo": "ppo", "dpo": "dpo", "compare": "compare"}
# The base model's identity and loading settings, beside config.yaml in output_dir.
BASE_MODEL_FILE = "base_model.json"

# Each stage folder records the settings that stage ran with (config.yaml is the latest invocation's).
SETTINGS_FILE = "settings.yaml"
LOCK_FILE = ".lock"

# output_dir (resolved) -> its open lock file: the run folders this process holds (a stage inside `run`
# finds the folder already held and proceeds).
_locks: dict[Path, Any] = {}


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold `output_dir/.lock` (an exclusive flock) while the body works in the run folder.

    A second process gets a one-line error naming the holder (pid, host, command, start time). The
    kernel releases a flock when its process dies, so the lock of a killed run (even `kill -9`) is
    free again at once and the next run takes it over; the holder written in the file is only
    information. Nested use in one process is allowed.
    """
    out = Path(output_dir).resolve()
    if out in _locks or not distributed.is_main():  # under N processes rank 0 holds the lock for all of them
        yield
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held until the body ends
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(
            f"run folder {out} is in use by {holder}; wait for it to finish (or stop it), or use another output_dir"
        ) from None
    except OSError as e:  # a file system without flock (some network mounts): run unlocked, say so
        logger.warning("could not lock %s (%s); make sure no other process uses this run folder", out, e)
    f.seek(0)
    previous = f.read().strip()
    if previous:
        logger.info("run folder %s: taking over the lock of %s, which is no longer running", out, previous)
    f.seek(0)
    f.truncate()
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    f.write(f"pid {os.getpid()} on {socket.gethostname()} (`{command}`, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _locks[out] = f
    try:
        yield
    finally:
        del _locks[out]
        f.seek(0)
        f.truncate()  # a clean release leaves no holder behind
        f.close()


def locked_stage(run):
    """Decorator for a stage's `run(cfg, force)`: the run folder is locked while the stage works in it."""

    @functools.wraps(run)
    def wrapper(cfg: RecipeConfig, force: bool = False):
        with run_lock(cfg.output_dir):
            out = run(cfg, force)
        distributed.barrier()  # under N processes: the next stage starts once rank 0 wrote this one's results
        return out

    return wrapper


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# model settings that move tensors between host and device without changing a value (nor a fingerprint)
PLACEMENT_ONLY = ("embeddings",)


def stage_settings(cfg: RecipeConfig, stage: str) -> dict:
    """The settings a stage's result depends on (a change means its checkpoints no longer apply)."""
    d = config_to_dict(cfg)
    model = {k: v for k, v in d["model"].items() if k not in PLACEMENT_ONLY}
    return {"seed": d["seed"], "model": model, "lora": d["lora"], stage: d[stage]}


class Manifest:
    """`output_dir/manifest.json`: which stages finished, when, and under which settings."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "manifest.json"
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {"stages": {}}
        except ValueError:
            raise UserError(f"{self.path} is corrupt; delete it to re-run every stage") from None
        stages = self.data.get("stages") if isinstance(self.data, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise UserError(
                f'{self.path} is not a manifest (expected {{"stages": {{stage: {{...}}}}}}); delete it to re-run '
                "every stage"
            )

    def finished(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def mark_finished(self, stage: str, info: dict) -> None:
        if not distributed.is_main():
            return
        self.data["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_json(self.path, self.data)

    def forget(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            atomic_write_json(self.path, self.data)


def read_run(run_dir: str | Path, trust_remote_code: bool = False) -> tuple[Path, RecipeConfig]:
    """(run_dir, resolved config) of a finished or running pipeline folder.

    The base model named in a run folder's config.yaml is loaded by `generate`, `score` and `compare`,
    so where it comes from is logged, and `model.trust_remote_code: true` from a folder (which lets
    the model's own Python code run) is refused unless the caller passed `trust_remote_code`.
    """
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml); pass the output_dir of a run")
    cfg = config_from_dict(read_recipe(cfg_path), where=str(cfg_path))
    _check_remote_code(cfg.model, cfg_path, trust_remote_code)
    return run, cfg


def _check_remote_code(model: ModelConfig, source: Path, allowed: bool) -> None:
    if model.trust_remote_code and not allowed:
        raise UserError(
            f"{source} sets model.trust_remote_code: true, which runs the model's own Python code; pass "
            "--trust-remote-code if you trust that run folder and its model"
        )


def stage_model(stage_dir: Path, cfg: RecipeConfig, trust_remote_code: bool = False) -> ModelConfig:
    """The base model a finished stage was trained on (its settings.yaml, else the run's config.yaml), logged."""
    recorded = read_stage_settings(stage_dir)
    source = Path(stage_dir) / SETTINGS_FILE
    if recorded is not None and isinstance(recorded.get("model"), dict):
        model = config_from_dict({"model": recorded["model"]}, where=str(source)).model
        # placement is not recorded with a stage's settings: the run's own config says it
        model = dataclasses.replace(model, **{k: getattr(cfg.model, k) for k in PLACEMENT_ONLY})
    else:
        model, source = cfg.model, Path(stage_dir).parent / "config.yaml"
    _check_remote_code(model, source, trust_remote_code)
    logger.info(
        "base model %s (model.name_or_path from %s%s)",
        model.name_or_path,
        source,
        ", with trust_remote_code" if model.trust_remote_code else "",
    )
    return model


def read_stage_settings(stage_dir: Path) -> dict | None:
    """The settings a stage ran with (`settings.yaml`), or None for a folder written before they were recorded."""
    path = Path(stage_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError):
        raise UserError(f"{path} is corrupt; re-run that stage with --force") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a settings file (expected a mapping); re-run that stage with --force")
    return data


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


def begin_stage(
    cfg: RecipeConfig, stage: str, force: bool, settings: dict | None = None
) -> tuple[Path, Manifest, bool]:
    """Prepare `output_dir/<stage>`; returns (stage_dir, manifest, already_finished).

    Under N processes rank 0 prepares the folder (see `_prepare_stage`) while the others wait, then
    they read the manifest it left.
    """
    if not distributed.is_main():
        distributed.barrier()
        out = Path(cfg.output_dir)
        manifest = Manifest(out)
        return out / STAGE_DIRS[stage], manifest, manifest.finished(stage) is not None
    prepared = _prepare_stage(cfg, stage, force, settings)
    distributed.barrier()
    return prepared


def _prepare_stage(
    cfg: RecipeConfig, stage: str, force: bool, settings: dict | None = None
) -> tuple[Path, Manifest, bool]:
    """begin_stage's work in the one process that writes.

    `settings` are what the stage's result depends on (its own section plus the fingerprints of the
    stages it builds on; default `stage_settings`): the same dict the stage fingerprints its
    checkpoints and manifest entry with, so an unchanged re-run compares like with like. A finished
    stage is skipped unless forced; a stage killed half-way keeps its checkpoints and resumes from
    them; `force` wipes the stage folder first. A resume refused for changed settings leaves
    config.yaml as it was; otherwise config.yaml and `<stage>/settings.yaml` record this invocation.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = stage_settings(cfg, stage) if settings is None else settings
    manifest = Manifest(out)
    stage_dir = out / STAGE_DIRS[stage]
    done = manifest.finished(stage)
    if done and not force:
        if done.get("settings") != fingerprint(settings):
            logger.warning(
                "%s: finished earlier with different settings; keeping that result (re-run with --force to redo it)",
                stage,
            )
        logger.info("%s: already finished in %s; skipping (use --force to run it again)", stage, stage_dir)
        return stage_dir, manifest, True
    if not force:  # refuse a resume under other settings before anything is rewritten
        ckpt = Checkpointer(stage_dir / "checkpoints", 1, fingerprint(settings), stage)
        latest = ckpt.latest()
        if latest is not None:
            ckpt.check(latest)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    describe_run(cfg, out)  # may build the tiny model: before the stage seeds its random state
    if force:
        manifest.forget(stage)
        shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / SETTINGS_FILE, yaml.safe_dump(settings, sort_keys=False))
    return stage_dir, manifest, False
