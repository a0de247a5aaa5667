"""Run folders: one process at a time, a clear manifest error, settings recorded per stage, remote code refused."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, fail_at, tiny_recipe

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.stages import rm, sft
from lowmem_rlhf.stages.compare import build_policies, open_run
from lowmem_rlhf.train.loop import TrainLoop


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def python(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, **kw)


def test_two_processes_on_one_run_folder(tmp_path, tiny_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(out, max_steps=1, save_steps=0))
    holder = python(
        "-c",
        "import sys, time; from lowmem_rlhf.stages.common import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
        str(out),
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = python("-m", "lowmem_rlhf", "sft", str(recipe), stderr=subprocess.PIPE)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert errors[0].startswith(
            f"error: run folder {out.resolve()} is in use by pid {holder.pid} on {os.uname().nodename} (`-c {out}`"
        )
        assert errors[0].endswith("wait for it to finish (or stop it), or use another output_dir")
        assert not (out / "sft").exists()  # the refused process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # like a crash: the kernel drops its lock, its note stays in .lock
        holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()
    third = python("-m", "lowmem_rlhf", "sft", str(recipe), stderr=subprocess.PIPE)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert f"taking over the lock of pid {holder.pid} on" in err
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    assert (out / ".lock").read_text() == ""  # released cleanly


def test_lock_is_reentrant_in_one_process(tmp_path):
    from lowmem_rlhf.stages.common import run_lock

    with run_lock(tmp_path), run_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    assert (tmp_path / ".lock").read_text() == ""


@pytest.mark.parametrize(
    "text",
    ['["sft"]', '{"stages": ["sft"]}', '{"stages": {"sft": 3}}', '{"finished": {}}'],
)
def test_structurally_wrong_manifest_is_one_clear_line(make_cfg, text):
    cfg = make_cfg()
    Path(cfg.output_dir).mkdir(parents=True)
    path = Path(cfg.output_dir) / "manifest.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        sft.run(cfg)
    assert str(e.value) == (
        f'{path} is not a manifest (expected {{"stages": {{stage: {{...}}}}}}); delete it to re-run every stage'
    )


def test_refused_resume_leaves_config_yaml_alone(make_cfg, monkeypatch):
    cfg = make_cfg("changed")
    with monkeypatch.context() as m:
        fail_at(m, TrainLoop, "_step", 4, RuntimeError("killed"))
        with pytest.raises(RuntimeError):
            sft.run(cfg)
    config_yaml = Path(cfg.output_dir) / "config.yaml"
    before = config_yaml.read_text()
    with pytest.raises(UserError, match="different sft settings.*--force"):
        sft.run(make_cfg("changed", learning_rate=1e-3))
    assert config_yaml.read_text() == before
    assert yaml.safe_load((Path(cfg.output_dir) / "sft" / "settings.yaml").read_text())["sft"]["learning_rate"] == 3e-3


def test_each_stage_records_its_settings_and_compare_labels_come_from_them(make_cfg, caplog):
    cfg = make_cfg("run", max_steps=1, save_steps=0)
    out = Path(cfg.output_dir)
    sft.run(cfg)
    with caplog.at_level(logging.WARNING):
        sft.run(make_cfg("run", max_steps=1, save_steps=0, learning_rate=1e-3))  # finished: skipped, warned
    assert "sft: finished earlier with different settings" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["sft"]["learning_rate"] == 3e-3  # a skip rewrites nothing
    recorded = yaml.safe_load((out / "sft" / "settings.yaml").read_text())
    assert recorded["sft"]["learning_rate"] == 3e-3 and recorded["model"]["name_or_path"] == "builtin:tiny"

    # a ppo stage that ran as GRPO, while the latest config.yaml says gae
    (out / "ppo").mkdir()
    (out / "ppo" / "settings.yaml").write_text(yaml.safe_dump({"ppo": {"advantage": "grpo"}}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["ppo"] = {"path": "ppo", "steps": 1, "metrics": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert yaml.safe_load((out / "config.yaml").read_text())["ppo"]["advantage"] == "gae"
    policies, _ = build_policies([open_run(out)], None)
    assert [p.label for p in policies] == ["run/sft", "run/grpo"]


def test_remote_code_from_a_run_folder_needs_the_flag(make_cfg, capsys):
    cfg = make_cfg("run", max_steps=1, save_steps=0)
    out = Path(cfg.output_dir)
    sft.run(cfg)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err  # the CLI logs to stderr
    assert f"base model builtin:tiny (model.name_or_path from {out / 'sft' / 'settings.yaml'})\n" in err

    data = yaml.safe_load((out / "config.yaml").read_text())
    data["model"]["trust_remote_code"] = True
    (out / "config.yaml").write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {out / 'config.yaml'} sets model.trust_remote_code: true, which runs the model's own Python "
        "code; pass --trust-remote-code if you trust that run folder and its model"
    )
    for command in (["score", str(out), "--input", "x.jsonl", "--output", "y.jsonl"], ["compare", str(out)]):
        assert main(command) == 2
        assert "pass --trust-remote-code" in capsys.readouterr().err
    # the stage's own record is checked too
    settings = yaml.safe_load((out / "sft" / "settings.yaml").read_text())
    settings["model"]["trust_remote_code"] = True
    (out / "sft" / "settings.yaml").write_text(yaml.safe_dump(settings))
    data["model"]["trust_remote_code"] = False
    (out / "config.yaml").write_text(yaml.safe_dump(data))
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert f"error: {out / 'sft' / 'settings.yaml'} sets model.trust_remote_code: true" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert (
        f"base model builtin:tiny (model.name_or_path from {out / 'sft' / 'settings.yaml'}, with trust_remote_code)"
        in capsys.readouterr().err
    )


def rm_recipe(out, **rm_keys) -> dict:
    data = tiny_recipe(out, max_steps=1, save_steps=0)
    data["stages"] = ["sft", "rm"]
    data["rm"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "max_samples": 8,
        "max_steps": 1,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "save_steps": 0,
        "max_length": 96,
        "stats_samples": 8,
        **rm_keys,
    }
    return data


def test_rerun_of_a_finished_stage_warns_only_when_its_settings_changed(tmp_path, tiny_path, caplog):
    out = tmp_path / "run"
    sft.run(config_from_dict(rm_recipe(out)))
    rm.run(config_from_dict(rm_recipe(out)))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rm.run(config_from_dict(rm_recipe(out)))
    assert "rm: already finished" in caplog.text
    assert "finished earlier with different settings" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rm.run(config_from_dict(rm_recipe(out, learning_rate=1e-5)))
    assert "rm: finished earlier with different settings; keeping that result" in caplog.text
