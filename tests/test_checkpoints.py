"""Checkpoints hold no pickle, survive a corrupt newest checkpoint and a full disk."""

import errno
import json
import logging
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import fail_at
from safetensors.torch import load_file

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.stages import sft
from lowmem_rlhf.train.checkpoint import FORMAT, Checkpointer, decode_state, encode_state, sha256_file
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.metrics import read_metrics


def adapter(stage_dir):
    return load_file(str(stage_dir / "adapter_model.safetensors"))


def killed_at(cfg, monkeypatch, step: int):
    """Run the SFT stage of `cfg` until a crash at `step` (only the periodic checkpoints survive)."""
    with monkeypatch.context() as m:
        fail_at(m, TrainLoop, "_step", step, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            sft.run(cfg)
    return Path(cfg.output_dir) / "sft" / "checkpoints"


def test_state_encoding_round_trips_optimizer_and_rng_without_pickle():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    state = {"optimizer": opt.state_dict(), "py": __import__("random").getstate(), "inf": float("inf")}
    tensors: dict = {}
    plain = json.loads(json.dumps(encode_state(state, tensors, "s"), allow_nan=False))
    back = decode_state(plain, tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)  # tuples stay tuples
    assert set(back["optimizer"]["state"]) == {0}  # int keys stay ints
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    assert back["py"] == state["py"] and back["inf"] == float("inf")
    with pytest.raises(TypeError, match="no safe encoding"):
        encode_state({"x": object()}, {}, "s")


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_paged_8bit_adamw_state_round_trips_exactly():
    """The CUDA default optimizer (bitsandbytes, runnable on CPU here): 8-bit states, shared qmaps, wrapped keys."""
    import bitsandbytes as bnb

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(8))]
        return params, bnb.optim.PagedAdamW8bit(params, lr=1e-2)

    def step(params, opt, k):
        g = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()

    params, opt = make()
    for k in range(2):
        step(params, opt, k)
    tensors: dict = {}
    plain = json.loads(json.dumps(encode_state(opt.state_dict(), tensors, "optimizer"), allow_nan=False))
    assert any(t.dtype == torch.uint8 for t in tensors.values())  # the 8-bit states travel as tensors
    params2, opt2 = make()
    with torch.no_grad():
        for a, b in zip(params2, params, strict=True):
            a.copy_(b)
    opt2.load_state_dict(decode_state(plain, tensors))
    step(params, opt, 5)
    step(params2, opt2, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(make_cfg, tmp_path, monkeypatch, caplog):
    cfg = make_cfg("run")
    ckpts = killed_at(cfg, monkeypatch, 4)  # step-0000003 is a real checkpoint
    fp = json.loads((ckpts / "step-0000003" / "state.json").read_text())["fingerprint"]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # a newer "checkpoint" in the old pickled format, with the right fingerprint: loading it would run `open`
    evil = ckpts / "step-0000005"
    evil.mkdir()
    torch.save({"rng": Payload()}, evil / "state.pt")
    (evil / "state.json").write_text(json.dumps({"step": 5, "fingerprint": fp}))
    # and a pickle disguised under the new file names, with a forged (correct) checksum
    forged = ckpts / "step-0000004"
    forged.mkdir()
    torch.save({"rng": Payload()}, forged / "tensors.safetensors")
    (forged / "trainer_state.json").write_text("{}")
    files = {n: sha256_file(forged / n) for n in ("tensors.safetensors", "trainer_state.json")}
    (forged / "state.json").write_text(json.dumps({"format": FORMAT, "step": 4, "fingerprint": fp, "files": files}))

    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="step-0000004 is unreadable"):
        sft.run(cfg)
    assert not marker.exists()
    assert "step-0000005 is unusable (it has no checksums" in caplog.text
    shutil.rmtree(forged)
    out = sft.run(cfg)
    assert not marker.exists()
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(make_cfg, monkeypatch, caplog):
    full = sft.run(make_cfg("full", save_steps=2))
    cfg = make_cfg("resumed", save_steps=2)
    ckpts = killed_at(cfg, monkeypatch, 5)  # checkpoints at steps 2 and 4
    newest = ckpts / "step-0000004" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        resumed = sft.run(cfg)
    lines = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert lines == [
        f"sft: checkpoint {ckpts / 'step-0000004'} is unusable (tensors.safetensors does not match its checksum "
        "(truncated or corrupt)); using step-0000002 instead"
    ]
    a, b = adapter(full), adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 3..6 redone exactly from step 2
    assert [m["step"] for m in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_full_disk_while_saving_keeps_the_previous_checkpoint(make_cfg, monkeypatch):
    cfg = make_cfg("run")
    real = safetensors.torch.save_file

    def full_disk(tensors, path, *a, **k):
        if "step-0000006" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # half written, then the device is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    ckpts = Path(cfg.output_dir) / "sft" / "checkpoints"
    (ckpts / ".tmp-step-0000001").mkdir(parents=True)  # left by a process killed while saving
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk)
        with pytest.raises(UserError) as e:
            sft.run(cfg)
    assert str(e.value) == (
        f"sft: no space left on the device of {ckpts} while saving the checkpoint of step 6; the partial checkpoint "
        f"was removed and the previous checkpoint {ckpts / 'step-0000003'} is kept. Free disk space (or lower "
        "save_total_limit) and re-run the same command to resume"
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]
    assert Checkpointer.problem(ckpts / "step-0000003") is None
    assert not (Path(cfg.output_dir) / "manifest.json").exists()  # not finished
    assert not (Path(cfg.output_dir) / "sft" / "adapter_model.safetensors").exists()
    out = sft.run(cfg)  # space is back: resumes from step 3 and finishes
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_tmpfs_gives_one_line_and_keeps_the_previous_checkpoint(make_cfg, small_tmpfs, monkeypatch, capsys):
    from lowmem_rlhf.cli import main

    cfg = make_cfg("unused")
    cfg.output_dir = str(small_tmpfs / "run")
    ckpts = killed_at(cfg, monkeypatch, 4)
    size = sum(f.stat().st_size for f in (ckpts / "step-0000003").iterdir())
    free = shutil.disk_usage(small_tmpfs).free
    with open(small_tmpfs / "filler", "wb") as f:  # leave half a checkpoint free
        f.write(b"\0" * (free - size // 2))
    recipe = small_tmpfs.parent / "recipe.yaml"
    recipe.write_text((small_tmpfs / "run" / "config.yaml").read_text())
    capsys.readouterr()
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: sft: no space left on the device of"), lines
    assert f"the previous checkpoint {ckpts / 'step-0000003'} is kept" in lines[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]  # no half-written temp folder
    assert Checkpointer.problem(ckpts / "step-0000003") is None


def test_full_disk_anywhere_is_one_line_from_the_cli(tmp_path, tiny_path, monkeypatch, capsys):
    import yaml
    from conftest import tiny_recipe
    from safetensors import SafetensorError

    from lowmem_rlhf.cli import main
    from lowmem_rlhf.model.bank import AdapterBank

    def full(self, name, directory):  # as safetensors words it when the final adapter cannot be written
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(AdapterBank, "save_role", full)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", max_steps=1, save_steps=0)))
    capsys.readouterr()
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: no space left on the device; free disk space and re-run the same command (finished stages and "
        "saved checkpoints are kept)"
    ]


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(make_cfg, monkeypatch):
    # format 2 held scalar heads with a bias and reward cursors counted in pairs: resuming it would fail deep in
    # the weight loading (or silently resume another data order), so it is refused before anything loads
    cfg = make_cfg("old", save_steps=2)
    ckpts = killed_at(cfg, monkeypatch, 3)  # a checkpoint at step 2
    state = ckpts / "step-0000002" / "state.json"
    info = json.loads(state.read_text())
    state.write_text(json.dumps(info | {"format": 2}))
    with pytest.raises(UserError, match=r"step-0000002 was written by an earlier version .* format 2; .* --force"):
        sft.run(cfg)
