"""`lowmem-rlhf <command> ...`: run recipes, validate and show them, sample from a run.

Errors the user can fix (recipe, data, paths, memory) print one line and exit with status 2; our own
bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from lowmem_rlhf import __version__
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.logs import setup_logging

POLICY_STAGES = ("sft", "ppo", "dpo")  # stages whose folder holds a policy adapter to sample from
STAGE_COMMANDS = {
    "sft": "lowmem_rlhf.stages.sft",
    "rm": "lowmem_rlhf.stages.rm",
    "ppo": "lowmem_rlhf.stages.ppo",
    "dpo": "lowmem_rlhf.stages.dpo",
    "compare": "lowmem_rlhf.stages.compare",
}


def _stage_module(name: str):
    import importlib

    return importlib.import_module(STAGE_COMMANDS[name])


def check_run_inputs(cfg, stages: list[str] | tuple[str, ...]) -> None:
    """What can be checked before anything is written or a model loads: the output folder is writable, the
    model can be fetched, and under a launch of N processes every global batch size of `stages` splits N ways."""
    from lowmem_rlhf import distributed
    from lowmem_rlhf.data.hub import check_model_source
    from lowmem_rlhf.train.io import ensure_writable_dir

    distributed.per_device_config(cfg, distributed.launched_world_size(), stages)
    ensure_writable_dir(cfg.output_dir, "output_dir")
    check_model_source(cfg.model.name_or_path, cfg.model.revision)


def report(line: str) -> None:
    """A command's result line, printed once: by the one process, or by rank 0 of a data-parallel launch."""
    from lowmem_rlhf import distributed

    if distributed.is_main():
        print(line)


def cmd_stage(args: argparse.Namespace) -> int:
    from lowmem_rlhf.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    check_run_inputs(cfg, [args.command])
    path = _stage_module(args.command).run(cfg, force=args.force)
    report(f"{args.command}: done -> {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lowmem_rlhf.config import load_config
    from lowmem_rlhf.stages.common import run_lock

    cfg = load_config(args.recipe, args.overrides)
    check_run_inputs(cfg, cfg.stages)
    with run_lock(cfg.output_dir):  # held across the stages, so no other process slips in between them
        for stage in cfg.stages:
            logging.getLogger(__name__).info("== stage %s ==", stage)
            path = _stage_module(stage).run(cfg, force=args.force)
            report(f"{stage}: done -> {path}")
    report(f"run finished: {cfg.output_dir}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lowmem_rlhf.config import load_config
    from lowmem_rlhf.data.formats import resolve_source
    from lowmem_rlhf.rewards import load_reward_fns

    failed = 0
    for recipe in args.recipes:
        try:
            cfg = load_config(recipe, args.overrides)
            for stage in cfg.stages:
                if stage == "compare":
                    source = cfg.compare.prompts or cfg.ppo.eval_dataset
                    if source is None:
                        raise UserError(f"recipe {recipe}: stage compare is listed but `compare.prompts` is not set")
                    resolve_source(source)
                    load_reward_fns(cfg.compare.judge, "judge")
                    continue
                if stage == "ppo":  # importable now, offline: a typo fails here, not after SFT
                    load_reward_fns(cfg.ppo.reward_funcs)
                    load_reward_fns(cfg.ppo.judges, "judge")
                for key in ("dataset", "eval_dataset"):
                    source = getattr(getattr(cfg, stage), key, None)
                    if source is not None:
                        resolve_source(source)  # a missing local file is an error; Hub ids are not fetched
                    elif key == "dataset":
                        raise UserError(f"recipe {recipe}: stage {stage} is listed but `{stage}.dataset` is not set")
            print(f"ok: {recipe}")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    from lowmem_rlhf.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lowmem_rlhf.data.chat import encode_prompt, end_of_turn_ids, to_messages
    from lowmem_rlhf.data.formats import load_rows
    from lowmem_rlhf.data.hub import check_model_source
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.model.loading import load_base
    from lowmem_rlhf.rollout.generate import SamplingConfig, generate
    from lowmem_rlhf.stages.common import Manifest, read_run, stage_model

    run_dir, cfg = read_run(args.run_dir, args.trust_remote_code)
    if args.stage not in POLICY_STAGES:
        hint = "; the reward model scores, use `lowmem-rlhf score`" if args.stage in ("rm", "reward") else ""
        raise UserError(
            f"--stage {args.stage}: not a stage with a policy to sample; use one of {', '.join(POLICY_STAGES)}{hint}"
        )
    finished = Manifest(run_dir).data["stages"]
    if args.stage not in finished:
        done = ", ".join(s for s in POLICY_STAGES if s in finished) or "none"
        raise UserError(
            f"--stage {args.stage}: {run_dir} has no finished {args.stage} stage (finished policies: {done}); "
            "run that stage first or pick a finished one"
        )
    prompts = list(args.prompt or [])
    if args.prompts_file:
        rows, name = load_rows(args.prompts_file)
        for i, row in enumerate(rows, start=1):
            if "prompt" not in row:
                raise UserError(f"{name}, row {i}: missing field `prompt`")
            prompts.append(row["prompt"])
    if not prompts:
        raise UserError("give at least one --prompt TEXT or a --prompts-file")
    stage_dir = run_dir / args.stage
    model_cfg = stage_model(stage_dir, cfg, args.trust_remote_code)
    check_model_source(model_cfg.name_or_path, model_cfg.revision)
    model, tokenizer = load_base(model_cfg)
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", from_dir=stage_dir)
    encoded = [encode_prompt(tokenizer, to_messages(p, "--prompt", "prompt")) for p in prompts]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    out = generate(bank, "policy", encoded, sampling, end_of_turn_ids(tokenizer), tokenizer.pad_token_id, args.seed)
    for prompt, ids in zip(prompts, out.response_ids, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": prompt, "response": text}))
        else:
            print(f"> {prompt}\n{text}\n")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from lowmem_rlhf.data.formats import load_rows
    from lowmem_rlhf.data.hub import check_model_source
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.model.loading import load_base
    from lowmem_rlhf.model.scoring import score_texts
    from lowmem_rlhf.stages.common import read_run, stage_model
    from lowmem_rlhf.stages.rm import ROLE, STATS_FILE
    from lowmem_rlhf.train.io import atomic_write_text, ensure_writable_dir, strict_dumps

    run, cfg = read_run(args.run_dir, args.trust_remote_code)
    reward_dir = run / "reward"
    if not (reward_dir / "adapter_config.json").is_file():
        raise UserError(f"{run} has no reward model ({reward_dir} holds no adapter); run its rm stage first")
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give the path of a .jsonl file to write")
    ensure_writable_dir(output.parent, f"--output {output}: folder")
    rows, name = load_rows(args.input)
    for i, row in enumerate(rows, start=1):
        for key in ("prompt", "response"):
            if key not in row:
                raise UserError(f"{name}, row {i}: missing field `{key}` (score input rows are {{prompt, response}})")
    model_cfg = stage_model(reward_dir, cfg, args.trust_remote_code)
    check_model_source(model_cfg.name_or_path, model_cfg.revision)
    model, tokenizer = load_base(model_cfg)
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role(ROLE, from_dir=reward_dir, head=True)
    scores = score_texts(
        bank,
        ROLE,
        tokenizer,
        [r["prompt"] for r in rows],
        [r["response"] for r in rows],
        batch_size=args.batch_size,
        max_length=cfg.rm.max_length,
    )
    stats_path = reward_dir / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    lines = []
    for row, s in zip(rows, scores, strict=True):
        out = {**row, "reward": s}
        if stats is not None:
            out["reward_normalized"] = (s - stats["mean"]) / max(stats["std"], 1e-8)
        lines.append(strict_dumps(out, ensure_ascii=False))
    atomic_write_text(args.output, "\n".join(lines) + "\n")
    print(f"scored {len(rows)} rows with {reward_dir} -> {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import dataclasses

    from lowmem_rlhf.stages.compare import compare_runs, open_run
    from lowmem_rlhf.train.io import ensure_writable_dir

    first = open_run(args.run_dirs[0], args.trust_remote_code)
    given = {
        "prompts": args.prompts,
        "num_prompts": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "batch_size": args.batch_size,
        "reward_from": args.reward_from,
        "judge": args.judge,
    }
    cc = dataclasses.replace(first.cfg.compare, runs=[], **{k: v for k, v in given.items() if v is not None})
    seed = first.cfg.seed if args.seed is None else args.seed
    output = ensure_writable_dir(args.output or first.path / "compare", "--output")
    compare_runs(args.run_dirs, cc, seed, output, args.trust_remote_code)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowmem_rlhf.stages.export import export

    path = export(args.run_dir, args.stage, args.output, merge=args.merge, dtype=args.dtype, force=args.force)
    print(f"export: done -> {path}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from lowmem_rlhf.config import load_config
    from lowmem_rlhf.distributed import per_device_config
    from lowmem_rlhf.model.memory import (
        CUDA_CONTEXT,
        FRAGMENTATION,
        estimate_recipe,
        gb,
        largest_fitting,
        parse_size,
    )

    cfg = load_config(args.recipe, args.overrides)
    stages = args.stage or [s for s in cfg.stages if s != "compare"] or ["sft"]
    card = parse_size(args.gpu_memory) if args.gpu_memory else None
    if args.num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.responses_per_prompt < 2:
        raise UserError(f"--responses-per-prompt {args.responses_per_prompt}: a ranking has at least 2 responses")
    # each of N data-parallel processes holds a whole base and runs the recipe's global sizes divided by N
    cfg = per_device_config(cfg, args.num_processes, stages)
    shape, source, estimates = estimate_recipe(cfg, stages, args.shape, args.responses_per_prompt)
    report = {
        "model": cfg.model.name_or_path,
        "shape_source": source,
        "shape": vars(shape),
        "num_processes": args.num_processes,
        "stages": {},
    }
    mc = cfg.model
    quant = mc.quantization + (" + double quant" if mc.double_quant and mc.quantization in ("nf4", "fp4") else "")
    dtype = "bfloat16" if mc.compute_dtype == "auto" else mc.compute_dtype
    lines = [
        f"model: {cfg.model.name_or_path} ({source}): {shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}; {quant}, compute {dtype}; LoRA r={cfg.lora.r} on {cfg.lora.target_modules}",
    ]
    if args.num_processes > 1:
        lines.append(
            f"per device, for {args.num_processes} data-parallel processes (the recipe's global batch sizes divided "
            f"by {args.num_processes}; docs/distributed.md)"
        )
    for e in estimates:
        entry = {
            "items": dict(e.items),
            "peak_phase": e.peak_phase,
            "phases_bytes": {p: e.phase_total(p) for p in e.phases},
            "allocated_bytes": e.allocated,
            "device_bytes": e.device_total,
            e.batch_key: e.batch,
            e.length_key: e.length,
        }
        lines += ["", f"stage {e.stage} ({e.batch_key}={e.batch}, {e.length_key}={e.length})"]
        width = max(len(k) for k, _ in e.items) + 2
        lines += [f"  {k:<{width}}{gb(v):>10}" for k, v in e.items]
        lines.append(f"  {'peak allocated (' + e.peak_phase + ')':<{width}}{gb(e.allocated):>10}")
        slack = f"+{round((FRAGMENTATION - 1) * 100)}% slack, +{gb(CUDA_CONTEXT)} CUDA context"
        lines.append(f"  {'on the card (' + slack + ')':<{width}}{gb(e.device_total):>10}")
        if card is not None:
            fits = e.device_total <= card
            batch = largest_fitting(cfg, shape, e.stage, card, "batch", args.responses_per_prompt)
            length = largest_fitting(cfg, shape, e.stage, card, "length", args.responses_per_prompt)
            verdict = "fits" if fits else "DOES NOT FIT"
            lines.append(
                f"  -> {verdict} in {gb(card)}: largest {e.batch_key} {batch or 'none'} "
                f"(at {e.length_key}={e.length}), largest {e.length_key} {length or 'none'} "
                f"(at {e.batch_key}={e.batch})"
            )
            entry.update({"fits": fits, "largest_batch": batch, "largest_length": length, "card_bytes": card})
        report["stages"][e.stage] = entry
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(lines))
        print("\nPredicted for full-length batches; docs/performance.md compares the estimate with measured peaks.")
    if card is not None and not all(v["fits"] for v in report["stages"].values()):
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowmem-rlhf",
        description="The whole RLHF pipeline (SFT, reward model, PPO, DPO) on one frozen 4-bit backbone.",
    )
    parser.add_argument("--version", action="version", version=f"lowmem-rlhf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides_help = "dotted overrides such as sft.learning_rate=1e-4 (checked like recipe keys)"
    trust_help = (
        "allow a run folder whose config.yaml sets model.trust_remote_code: true (runs the model's own Python code)"
    )

    p = sub.add_parser("run", help="run every stage the recipe lists, in order")
    p.add_argument("recipe", help="path of a YAML recipe")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--force", action="store_true", help="re-run stages that already finished")
    p.set_defaults(func=cmd_run)

    for name, text in (
        ("sft", "supervised fine-tuning of the policy adapter"),
        ("rm", "train the reward model (adapter + score head) on preference data"),
        ("ppo", "RL on the shared backbone: PPO, GRPO, RLOO or ReMax (ppo.advantage)"),
        ("dpo", "DPO from the SFT adapter against a frozen copy of it on the same backbone"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="path of a YAML recipe")
        p.add_argument("overrides", nargs="*", help=overrides_help)
        p.add_argument("--force", action="store_true", help="run the stage again even if it finished")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("validate", help="check recipes (keys, types, data paths) without loading a model")
    p.add_argument("recipes", nargs="+", help="one or more YAML recipes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=overrides_help)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="print the resolved recipe, every default filled in")
    p.add_argument("recipe", help="path of a YAML recipe")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "estimate",
        help="predict each stage's peak GPU memory from the model's config.json (nothing is loaded)",
        description="Predicts the peak GPU memory of each stage of a recipe from the model's config.json alone "
        "(or a known shape), offline. With --gpu-memory, says whether each stage fits and the largest batch "
        "size and sequence length that do; exits 1 when a stage does not fit.",
    )
    p.add_argument("recipe", help="path of a YAML recipe")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--gpu-memory", metavar="SIZE", help="the card's memory, e.g. 12GB, 16GB, 24GB")
    p.add_argument(
        "--stage",
        action="append",
        choices=["sft", "rm", "ppo", "dpo"],
        help="stage to estimate (repeatable; default: the recipe's stages)",
    )
    p.add_argument("--shape", help="use a known architecture instead of model.name_or_path's config.json")
    p.add_argument(
        "--responses-per-prompt",
        type=int,
        default=2,
        metavar="K",
        help="rm: responses ranked per prompt; rm.batch_size prompts put K sequences each through one pass (default 2)",
    )
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="per-device memory when N data-parallel processes (accelerate launch --num_processes N) split the "
        "recipe's global batch sizes",
    )
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("score", help="score prompt/response rows with a run's reward model")
    p.add_argument("run_dir", help="output_dir of a run whose rm stage finished")
    p.add_argument("--input", required=True, help="JSONL/JSON/CSV/Parquet rows with `prompt` and `response`")
    p.add_argument(
        "--output", required=True, help="JSONL file to write: each row plus `reward` (and `reward_normalized`)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    p.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "compare",
        help="sample SFT and every finished PPO/DPO policy of the runs on the same prompts; report and plots",
        description="Samples every finished policy (ppo, dpo) of the given runs and each run's SFT policy on the "
        "same prompts with the same seeds; scores them with the reward model and any judge functions "
        "(--judge, compare.judge); writes report.md, report.json, samples.jsonl and PNG plots. Options left out "
        "take the first run's `compare` settings.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of runs with a finished sft stage")
    p.add_argument("--prompts", help="held-out prompts file or Hub id (default: compare.prompts or ppo.eval_dataset)")
    p.add_argument("--output", help="report folder (default: RUN_DIR/compare of the first run)")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts, 0 = all (default: compare.num_prompts)")
    p.add_argument("--max-new-tokens", type=int, help="longest response (default: compare.max_new_tokens)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: 1.0)")
    p.add_argument("--top-k", type=int, help="top-k sampling, 0 = off (default)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the first run's seed)")
    p.add_argument("--batch-size", type=int, help="prompts per generation batch (default: compare.batch_size)")
    p.add_argument("--reward-from", metavar="RUN_DIR", help="score every sample with this run's reward model")
    p.add_argument(
        "--judge",
        action="append",
        metavar="FILE.py:FN",
        help="judge function scoring every sample, 'file.py:function' or 'package.module:function' (repeatable; "
        "default: compare.judge)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="sample from a run's adapter for given prompts")
    p.add_argument("run_dir", help="output_dir of a run")
    p.add_argument("--stage", default="sft", help="stage whose adapter to sample from (default: sft)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="JSONL/JSON/CSV/Parquet file with a `prompt` field per row")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest response (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--trust-remote-code", action="store_true", help=trust_help)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export",
        help="write a finished stage as a standard Hugging Face folder (PEFT adapter, merged model, reward model)",
        description="Exports a stage of a run: a PEFT adapter with the tokenizer, generation config and a model "
        "card; with --merge a standalone model whose LoRA is merged into the 16/32-bit base (streamed shard by "
        "shard); --stage reward gives a sequence classifier (num_labels=1). See docs/export.md.",
    )
    p.add_argument("run_dir", help="output_dir of a run")
    p.add_argument("--stage", required=True, choices=["sft", "ppo", "dpo", "reward"], help="stage to export")
    p.add_argument("--output", required=True, help="folder to write (must not exist unless --force)")
    p.add_argument("--merge", action="store_true", help="merge the LoRA into the base: a standalone model")
    p.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights of a merged export (default: bf16)"
    )
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`sft RECIPE --force a.b=1`): argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # safetensors reports a full disk only in its message ("... (os error 28)")
        if getattr(e, "errno", None) != errno.ENOSPC and f"os error {errno.ENOSPC})" not in str(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"error: no space left on the device{where}; free disk space and re-run the same command "
            "(finished stages and saved checkpoints are kept)",
            file=sys.stderr,
        )
        return 2
