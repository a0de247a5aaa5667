"""`lowmem-rlhf export`: a finished stage of a run as a standard Hugging Face folder.

- policy stages (sft, ppo, dpo), default: the PEFT adapter (its `base_model_name_or_path` pointing at the
  real base), the run's tokenizer with its chat template, `generation_config.json` whose EOS ids include
  the end of an assistant turn, and a model card;
- policy stages with `merge=True`: a standalone `AutoModelForCausalLM` folder. The LoRA delta is added
  to the base's 16/32-bit weights read from its safetensors files, never to 4-bit weights (rounding a
  merged delta into NF4 loses most of it, peft #2321);
- `reward`: a standalone `AutoModelForSequenceClassification` folder (num_labels=1), merged, with our
  score head as its `score` layer.

Merging streams the base shard by shard: read one shard, add B @ A * scaling to the adapted weights in
it, cast, write it. Peak CPU memory is about one input shard (memory-mapped) plus one output shard plus
one fp32 matrix, whatever the model's size. Everything is written into a temporary folder beside the
output and renamed at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.heads import HEAD_FILE
from lowmem_rlhf.progress import Progress
from lowmem_rlhf.stages.common import BASE_MODEL_FILE, STAGE_DIRS, Manifest, base_model_info, read_run

logger = logging.getLogger(__name__)

# `--stage` -> the manifest's stage name (the reward stage is `rm` in recipes and the manifest).
EXPORT_STAGES = {"sft": "sft", "ppo": "ppo", "dpo": "dpo", "reward": "rm"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# peft settings a plain `B @ A * scaling` merge does not reproduce; our recipes never set them.
_UNMERGEABLE = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication",
                "target_parameters", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "use_qalora")  # fmt: skip


def export(
    run_dir: str | Path,
    stage: str,
    output: str | Path,
    merge: bool = False,
    dtype: str = "bf16",
    force: bool = False,
) -> Path:
    """Export `stage` (sft, ppo, dpo or reward) of the run in `run_dir` to `output`; returns `output`.

    merge=False (policy stages): PEFT adapter + tokenizer + generation config + model card.
    merge=True, or stage="reward": a standalone model in `dtype` (bf16, fp16 or fp32).
    An existing `output` is replaced only with force=True.
    """
    if stage not in EXPORT_STAGES:
        raise UserError(f"export: unknown stage {stage!r}; choose one of {', '.join(EXPORT_STAGES)}")
    if dtype not in DTYPES:
        raise UserError(f"export: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    run, cfg = read_run(run_dir)
    key = EXPORT_STAGES[stage]
    stage_dir = run / STAGE_DIRS[key]
    done = Manifest(run).finished(key)
    if done is None or not (stage_dir / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"{stage_dir}: the {stage} stage of this run has not finished; run it first "
            f"(`lowmem-rlhf {key} RECIPE` or `lowmem-rlhf run RECIPE`), then export"
        )
    output = Path(output)
    target, stages = output.resolve(), [(run / d).resolve() for d in STAGE_DIRS.values()]
    if (
        target == run.resolve()
        or target in run.resolve().parents
        or any(s == target or s in target.parents for s in stages)
    ):
        raise UserError(f"--output {output} would overwrite the run {run} or one of its stages; choose another folder")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; choose another --output or pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder; choose another --output")
    merged = merge or stage == "reward"
    info = _base_info(run, cfg)
    base = locate_base(info, cfg, weights=merged)
    files = base_weight_files(base) if merged else []
    out_dtype = DTYPES[dtype]
    expected = _dir_size(stage_dir, (ADAPTER_CONFIG, ADAPTER_WEIGHTS)) + 16 * 2**20  # + tokenizer, card
    if merged:
        expected += sum(_tensor_bytes(base / f, out_dtype) for f in files)
    check_disk(output, expected)

    tokenizer = _run_tokenizer(run, cfg)
    with staging(output, force) as tmp:
        tokenizer.save_pretrained(tmp)
        if stage == "reward":
            bias = _export_reward(base, files, stage_dir, tmp, out_dtype, tokenizer)
            card = model_card(run, cfg, info, stage, done, kind="reward", dtype=dtype, head_bias=bias)
        elif merged:
            _export_merged(base, files, stage_dir, tmp, out_dtype, tokenizer)
            card = model_card(run, cfg, info, stage, done, kind="merged", dtype=dtype)
        else:
            _export_adapter(base, info, stage_dir, tmp, tokenizer)
            card = model_card(run, cfg, info, stage, done, kind="adapter")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    logger.info("export: %s of %s -> %s", stage, run, output)
    return output


# ----------------------------------------------------------------------------------------------------
# the base model and the output folder


def _base_info(run: Path, cfg) -> dict:
    """base_model.json of the run; runs made before it existed fall back to their config.yaml."""
    path = run / BASE_MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else base_model_info(cfg)


def locate_base(info: dict, cfg, weights: bool) -> Path:
    """The local folder of the run's base model (its config files, and its safetensors if `weights`).

    A Hub id is looked up in the Hugging Face cache, and downloaded when the Hub can be reached
    (HF_HUB_OFFLINE unset); a base that is neither here nor reachable is a one-line error.
    """
    from lowmem_rlhf.builtins import is_builtin
    from lowmem_rlhf.model.loading import resolve_path

    name, local = info["name_or_path"], info.get("local_path")
    if local and (Path(local) / "config.json").is_file():
        return Path(local)
    if is_builtin(name):
        built = Path(resolve_path(cfg.model)).resolve()
        if local and built != Path(local):
            raise UserError(
                f"the bundled base {name} this run was trained on ({local}) is gone and today's build ({built}) "
                "differs; "
                "re-run the pipeline to export it"
            )
        return built
    from lowmem_rlhf.model.gguf import names_gguf

    if names_gguf(cfg.model):  # a GGUF base whose converted folder was removed from the cache: convert it again
        return Path(resolve_path(cfg.model))
    if Path(name).is_dir():
        return Path(name)
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download

    revision = info.get("revision")
    where = f"{name!r}" + (f" (revision {revision})" if revision else "")
    offline = constants.HF_HUB_OFFLINE
    patterns = ["*.json", "*.safetensors"] if weights else ["*.json"]
    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except (huggingface_hub.errors.HFValidationError, huggingface_hub.errors.HfHubHTTPError, OSError, ValueError) as e:
        how = "HF_HUB_OFFLINE is set" if offline else f"it could not be downloaded: {type(e).__name__}"
        raise UserError(
            f"base model {where} is not available offline: no such local folder, not in the Hugging Face cache, "
            f"and {how}; download it first (`hf download {name}`) or export where the Hub can be reached"
        ) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"base model {where}: its cached copy in {folder} has no config.json; download it again")
    return folder


def base_weight_files(base: Path) -> list[str]:
    """The base's safetensors files, in index order; an error for quantized or .bin-only checkpoints."""
    config = json.loads((base / "config.json").read_text())
    if "quantization_config" in config:
        raise UserError(
            f"base model in {base} is stored quantized ({config['quantization_config'].get('quant_method')}); "
            "merging needs its 16/32-bit weights: point model.name_or_path at the unquantized model, "
            "or export without --merge"
        )
    if (base / SAFE_INDEX).is_file():
        weight_map = json.loads((base / SAFE_INDEX).read_text())["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    if (base / SAFE_SINGLE).is_file():
        return [SAFE_SINGLE]
    raise UserError(f"base model in {base} has no safetensors weights; merging reads only safetensors files")


def _tensor_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the floating-point tensors of a safetensors file take in `dtype` (others as stored)."""
    from safetensors import safe_open

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            float_type = s.get_dtype() in ("F64", "F32", "F16", "BF16")
            total += math.prod(s.get_shape()) * (itemsize if float_type else sizes.get(s.get_dtype(), 8))
    return total


def _dir_size(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def check_disk(output: Path, needed: int) -> None:
    """Refuse before writing anything when the output's file system has less room than the export needs."""
    where = output.absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise UserError(
            f"not enough disk space for {output}: the export needs about {needed / 2**30:.2f} GB and {where} has "
            f"{free / 2**30:.2f} GB free; free some space or choose another --output"
        )


@contextlib.contextmanager
def staging(output: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside `output` that becomes `output` when the body succeeds, and vanishes if not."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        yield tmp
        _default_permissions(tmp)
        if output.exists() and force:
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
            os.replace(output, old / "x")
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder (and safetensors private files); give them the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _run_tokenizer(run: Path, cfg):
    """The tokenizer every stage used: saved in the run folder, else (older runs) rebuilt from the recipe."""
    if (run / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(run))
    from lowmem_rlhf.model.loading import load_tokenizer

    return load_tokenizer(cfg.model)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(base: Path, out: Path, tokenizer) -> None:
    path = base / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    gen.pop("_from_model_config", None)  # else transformers may rebuild it from config.json, losing our EOS ids
    # the template's end-of-turn token and the tokenizer's EOS, then the base's own list: what training stopped at
    gen["eos_token_id"] = end_of_turn_ids(tokenizer, gen.get("eos_token_id"))
    gen["pad_token_id"] = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.setdefault("bos_token_id", tokenizer.bos_token_id)
    _write_json(out / "generation_config.json", gen)


# ----------------------------------------------------------------------------------------------------
# the three kinds of export


def _export_adapter(base: Path, info: dict, stage_dir: Path, out: Path, tokenizer) -> None:
    config = json.loads((stage_dir / ADAPTER_CONFIG).read_text())
    # Hub ids stay ids (portable); a local base (builtin:tiny included) is named by its folder.
    hub = info.get("local_path") is None and not Path(info["name_or_path"]).is_dir()
    config["base_model_name_or_path"] = info["name_or_path"] if hub else str(base)
    config["revision"] = info.get("revision")
    config["inference_mode"] = True
    _write_json(out / ADAPTER_CONFIG, config)
    shutil.copyfile(stage_dir / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    _write_generation_config(base, out, tokenizer)


def _model_config(base: Path, dtype: torch.dtype) -> dict:
    config = json.loads((base / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    config["use_cache"] = True
    return config


def _export_merged(base: Path, files: list[str], stage_dir: Path, out: Path, dtype: torch.dtype, tokenizer) -> None:
    merge_shards(base, files, stage_dir, out, dtype)
    _write_json(out / "config.json", _model_config(base, dtype))
    _write_generation_config(base, out, tokenizer)


def _export_reward(base: Path, files: list[str], stage_dir: Path, out: Path, dtype: torch.dtype, tokenizer) -> float:
    """Merged sequence classifier; returns the bias of our score head that the `score` layer cannot hold."""
    import transformers
    from safetensors.torch import load_file

    config = _model_config(base, dtype)
    arch = (config.get("architectures") or [""])[0]
    cls_name = arch.replace("ForCausalLM", "ForSequenceClassification")
    if not arch.endswith("ForCausalLM") or not hasattr(transformers, cls_name):
        raise UserError(
            f"base model in {base} ({arch or 'no architectures in config.json'}) has no transformers "
            "sequence-classification class; export the reward adapter with --stage reward is not possible for it"
        )
    head = load_file(str(stage_dir / HEAD_FILE))
    bias = float(head["bias"].reshape(())) if "bias" in head else 0.0
    if bias != 0.0:
        logger.warning(
            "export: the score head's bias %+.6g has no slot in %s (its score layer has none) and is dropped: "
            "exported rewards are the toolkit's minus %.6g (Bradley-Terry rewards are shift-invariant)",
            bias,
            cls_name,
            bias,
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        logger.warning(
            "export: the pad token is the EOS token, so transformers reads a padded sequence's reward before its "
            "closing EOS, where the toolkit reads it at the EOS; score such sequences one at a time, unpadded"
        )
    score = head["weight"].reshape(1, -1)
    merge_shards(base, files, stage_dir, out, dtype, drop=("lm_head.weight",), extra={"score.weight": score})
    config.update(architectures=[cls_name], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    config["pad_token_id"] = tokenizer.pad_token_id
    _write_json(out / "config.json", config)
    stats = stage_dir / "reward_stats.json"
    if stats.is_file():
        shutil.copyfile(stats, out / "reward_stats.json")
    return bias


# ----------------------------------------------------------------------------------------------------
# streamed merge


def _lora_modules(adapter_dir: Path) -> tuple[dict[str, tuple[str, str]], float, list[str]]:
    """({base weight name: (lora_A key, lora_B key)}, scaling, problems) of a saved PEFT LoRA adapter."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    problems = [k for k in _UNMERGEABLE if config.get(k)]
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')}")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    modules: dict[str, tuple[str, str]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for k in f.keys():
            if ".lora_A." in k:
                module = k.split(".lora_A.")[0].removeprefix("base_model.model.")
                modules[f"{module}.weight"] = (k, k.replace(".lora_A.", ".lora_B."))
            elif ".lora_B." not in k:
                problems.append(f"tensor {k}")
    return modules, scaling, problems


@torch.no_grad()
def merge_shards(
    base: Path,
    files: list[str],
    adapter_dir: Path,
    out: Path,
    dtype: torch.dtype,
    drop: tuple[str, ...] = (),
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """Write base + LoRA delta, cast to `dtype`, shard by shard with the base's file names; returns the weight map.

    Each adapted weight becomes dtype(W + scaling * B @ A), computed in fp32. `drop` names base tensors
    to leave out, `extra` tensors to add (to the last file). Peak memory: one input shard (memory-mapped)
    + one output shard + one fp32 matrix.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    modules, scaling, problems = _lora_modules(adapter_dir)
    if problems:
        raise UserError(
            f"{adapter_dir / ADAPTER_CONFIG}: the adapter uses {', '.join(problems[:3])}, which a LoRA merge "
            "does not cover; export without --merge"
        )
    weight_map: dict[str, str] = {}
    total = 0
    keys = {name: _shard_keys(base / name, drop) for name in files}  # headers only: the count for the progress
    count = sum(map(len, keys.values()))
    with (
        safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as lora,
        Progress("export: merging", count, "tensors", logger) as progress,
    ):
        for i, name in enumerate(files):
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(base / name), framework="pt") as f:
                for key in keys[name]:
                    t = f.get_tensor(key)
                    if key in modules:
                        a_key, b_key = modules.pop(key)
                        w = t.float()
                        w.addmm_(lora.get_tensor(b_key).float(), lora.get_tensor(a_key).float(), alpha=scaling)
                        t = w
                    tensors[key] = _cast(t, dtype, key)
                    progress.update()
            if i == len(files) - 1 and extra:
                tensors.update({k: _cast(v, dtype, k) for k, v in extra.items()})
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    if modules:
        raise UserError(
            f"{adapter_dir}: adapter weights for {', '.join(sorted(modules)[:3])} match no tensor of the base "
            f"checkpoint in {base}; export without --merge"
        )
    if len(files) > 1:
        _write_json(out / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map


def _shard_keys(path: Path, drop: tuple[str, ...]) -> list[str]:
    """The names of the tensors of one safetensors file that the merge writes, in the file's order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if k not in drop]


def _cast(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    if not t.is_floating_point():
        return t.contiguous()
    t = t.to(dtype).contiguous()
    if not torch.isfinite(t).all():
        raise UserError(
            f"export: merged weight {key} is not finite in {str(dtype).removeprefix('torch.')}; "
            "choose --dtype bf16 or fp32"
        )
    return t


# ----------------------------------------------------------------------------------------------------
# model card


def model_card(
    run: Path, cfg, info: dict, stage: str, done: dict, kind: str, dtype: str | None = None, head_bias: float = 0.0
) -> str:
    """README.md of the export: base and revision, how to load it, final metrics, compare summary, recipe."""
    on_hub = info.get("local_path") is None and not Path(info["name_or_path"]).is_dir()
    base_id = info["name_or_path"] if on_hub else info.get("local_path") or info["name_or_path"]
    revision = info.get("revision") or "default branch"
    quant = info.get("quantization")
    trained_on = {"nf4": "NF4 4-bit", "fp4": "FP4 4-bit", "int8": "int8 8-bit"}.get(quant, "unquantized")
    library = "peft" if kind == "adapter" else "transformers"
    lines = [
        "---",
        *([f"base_model: {base_id}"] if on_hub else []),  # the Hub's metadata wants a Hub id
        f"library_name: {library}",
        "tags:",
        "- lowmem-rlhf",
        f"- {'reward-model' if stage == 'reward' else stage}",
        "---",
        "",
        f"# {Path(cfg.output_dir).name} / {stage}",
        "",
        f"The `{stage}` stage of the lowmem-rlhf run `{run}`, exported with `lowmem-rlhf export`.",
        "",
        f"- Base model: `{info['name_or_path']}` (revision: {revision})"
        + (f", local folder `{info['local_path']}`" if info.get("local_path") else ""),
        f"- Trained as a LoRA adapter on the base loaded {trained_on}"
        + (f" (double quantization: {info.get('double_quant')})" if quant in ("nf4", "fp4") else "")
        + f", compute dtype {info.get('compute_dtype')}.",
    ]
    if kind == "adapter":
        lines += [
            "- This folder: the PEFT LoRA adapter, the tokenizer with its chat template, and "
            "`generation_config.json` (EOS ids that end an assistant turn).",
            "",
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
            'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            'generation_config = GenerationConfig.from_pretrained("THIS_FOLDER")',
            "```",
            "",
            "Loading the base with the same 4-bit settings as training (`BitsAndBytesConfig` with the values "
            "above) reproduces the toolkit's outputs token for token.",
        ]
    elif kind == "merged":
        lines += [
            f"- This folder: a standalone model, the LoRA merged into the base's {dtype} weights (not into the "
            "4-bit ones), sharded like the base, with the tokenizer and its chat template.",
            "",
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
        ]
    else:
        lines += [
            f"- This folder: a sequence classifier (`num_labels=1`, {dtype}), the reward adapter merged into the "
            "base, our score head as its `score` layer. The reward is `logits[:, 0]`, read at the last "
            "token that is not padding: pad on the right, and end each response with the EOS token as the "
            "chat template does. `reward_stats.json` holds the mean/std of training rewards.",
        ]
        if head_bias:
            lines.append(
                f"- The score head's bias ({head_bias:+.6g}) has no slot in this layout and was dropped: rewards "
                f"here are the toolkit's minus {head_bias:.6g} (Bradley-Terry rewards are shift-invariant)."
            )
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
        ]
    metrics = done.get("metrics") or {}
    if metrics:
        lines += ["", "## Final metrics of the stage", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    report = run / STAGE_DIRS["compare"] / "report.md"
    if report.is_file():
        table = [line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
        if table:
            lines += ["", "## Comparison (`lowmem-rlhf compare`)", "", *table]
    lines += ["", "## Recipe", "", "```yaml", (run / "config.yaml").read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(lines)
