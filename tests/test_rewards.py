"""Reward functions and judges: built-in rules, loading and its errors, scores -> advantages, no reward model."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, tiny_recipe

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import CompareConfig, LoRAConfig, ModelConfig, PPOConfig, config_from_dict, config_to_dict
from lowmem_rlhf.data.chat import encode_prompt, to_messages
from lowmem_rlhf.data.prompts import prompt_columns
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.model.memory import estimate_stage, resolve_shape
from lowmem_rlhf.rewards import (
    answer_match,
    load_reward_fn,
    load_reward_fns,
    regex_match,
    repetition_penalty,
    target_length,
)
from lowmem_rlhf.rollout.generate import Generation
from lowmem_rlhf.stages import compare, ppo, sft
from lowmem_rlhf.train import ppo as ppo_module
from lowmem_rlhf.train.metrics import read_metrics
from lowmem_rlhf.train.ppo import PPOTrainer

# ----------------------------------------------------------------------------------------------------
# built-in rule rewards, on hand-made cases


def test_answer_match_numbers_and_strings():
    completions = [
        "Natalia sold 48 + 24 = 72 clips.\n#### 72",  # GSM8K marker
        "So the total is \\boxed{1,000}.",  # thousands comma, boxed
        "The answer is 72.0",  # numeric equality, not string equality
        "4 plus 9 is 13. Let me know if that helps.",  # no marker: the last number
        "4 plus 9 is 12.",
        "A banana is yellow.",  # no marker: the answer as whole words
        "A banana is yellowish.",
        "Final answer: The Eiffel Tower!",  # marker: normalised text must equal (articles, case, punctuation)
        "Final answer: the eiffel tower in Paris",
        "no number here",
    ]
    answers = [
        "She sold 48 + 24 = 72.\n#### 72",
        "1000",
        72,
        "13",
        "13",
        "yellow",
        "yellow",
        "eiffel tower",
        "eiffel tower",
        "5",
    ]
    assert answer_match(None, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # None where a row has no answer; another column by name
    assert answer_match(None, ["#### 3", "#### 3"], column="gold", gold=["3", None]) == [1.0, None]
    with pytest.raises(ValueError, match="no column 'answer'"):
        answer_match(None, ["x"], solution=["1"])


def test_regex_length_and_repetition_rules():
    r1 = "<think>\nadd them\n</think> <answer>7</answer>"
    assert regex_match(None, [r1, "7"], pattern=r"<answer>.*</answer>") == [1.0, 0.0]
    assert regex_match(
        None, [r1, "x <answer>7</answer>"], pattern=r"<think>.*</think>\s*<answer>.*</answer>", full=True
    ) == [
        1.0,
        0.0,
    ]
    # -|n - target| / target: tokens come from completion_ids, words and chars from the text
    ids = [[1] * 4, [1] * 8, [1] * 12, []]
    assert target_length(None, ["", "", "", ""], target=8, completion_ids=ids) == [-0.5, 0.0, -0.5, -1.0]
    assert target_length(None, ["one two three", "a"], target=2, unit="words") == [-0.5, -0.5]
    assert target_length(None, ["abcd"], target=2, unit="chars") == [-1.0]
    # 7 words -> 5 trigrams, 3 distinct ("a b c" x2, "b c a" x2... ): 1 - 3/5 = 0.4
    assert repetition_penalty(None, ["a b c a b c a", "a b c d", "a b"]) == [pytest.approx(-0.4), 0.0, 0.0]
    assert repetition_penalty(None, ["x y x y x y"], ngram=2) == [pytest.approx(-(1 - 2 / 5))]


def test_prompt_rows_keep_their_columns():
    rows = [
        {"prompt": "What is 2 plus 2?", "answer": "4", "level": 1},
        {
            "messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}],
            "answer": "3",
        },
    ]
    assert prompt_columns(rows) == {
        "answer": ["4", "3"],
        "level": [1, None],  # a row without the column gets None
        "messages": [None, rows[1]["messages"]],  # a chat prompt keeps its messages (the prompt column does not)
    }


# ----------------------------------------------------------------------------------------------------
# loading and every error a user's function can cause: one line naming the function


def one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_load_by_path_module_and_bound_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = "    return [float(c == a) for c, a in zip(completions, answer)]\n"
    (tmp_path / "mine.py").write_text("def exact(prompts, completions, answer, **kwargs):\n" + body)
    f = load_reward_fn("mine.py:exact")  # relative to the working directory, like a dataset path
    assert f.name == "exact"
    assert f(["p", "q"], ["7", "8"], [[1], [2]], {"answer": ["7", "9"]}, ["r1", "r2"]) == [1.0, 0.0]
    g = load_reward_fn("lowmem_rlhf.rewards:target_length(target=4, unit='words')")
    assert g.name == "target_length" and g.bound == {"target": 4, "unit": "words"}
    assert g(["p"], ["a b c d e f"], [[1]], {}, ["r"]) == [-0.5]
    assert load_reward_fn("lowmem_rlhf.tiny.judge:gold")(
        ["What is 2 plus 3?"], ["Sure! 2 plus 3 is 5."], [[1]], {}, ["r"]
    ) == [2.5]
    # a file imports its neighbours, wherever the command runs from
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper.py").write_text("BONUS = 0.5\n")
    (tmp_path / "sub" / "rules.py").write_text(
        "from helper import BONUS\n\ndef b(prompts, completions, **kw):\n    return [BONUS] * len(prompts)\n"
    )
    assert load_reward_fn("sub/rules.py:b")(["p"], ["c"], [[1]], {}, ["r"]) == [0.5]
    with pytest.raises(UserError) as e:
        load_reward_fns(["mine.py:exact", "lowmem_rlhf.rewards:answer_match", "mine.py:exact"])
    one_line(e, "two reward functions are named 'exact'")
    # judges are named as judges, and may not take a name the samples already use
    with pytest.raises(UserError) as e:
        load_reward_fns(["mine.py:nope"], "judge")
    one_line(e, "judge mine.py:nope: mine.py has no function `nope`")
    (tmp_path / "kl.py").write_text("def kl(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    assert [f.name for f in load_reward_fns(["kl.py:kl"])] == ["kl"]  # a reward function: logged as reward/kl/...
    with pytest.raises(UserError) as e:
        load_reward_fns(["kl.py:kl"], "judge")
    one_line(e, "judge kl.py:kl: the name 'kl' is already a column")
    with pytest.raises(UserError) as e:
        g.check_call(["answer", "target"])
    one_line(e, "target", "bound in the recipe but is also a column")


@pytest.mark.parametrize(
    ("source", "spec", "needles"),
    [
        (None, "missing.py:fn", ["missing.py:fn", "file missing.py not found"]),
        (
            "def other(prompts, completions, **kw):\n    return []\n",
            "user.py:fn",
            ["user.py:fn", "has no function `fn`"],
        ),
        ("import not_a_module_xyz\n", "user.py:fn", ["user.py:fn", "importing user.py raised ModuleNotFoundError"]),
        ("raise RuntimeError('bad setup')\n", "user.py:fn", ["user.py:fn", "RuntimeError: bad setup"]),
        (None, "no_such_pkg_xyz.mod:fn", ["no_such_pkg_xyz.mod:fn", "no module named 'no_such_pkg_xyz'"]),
        (None, "lowmem_rlhf.rewards:nothing", ["has no function `nothing`"]),
        (None, "lowmem_rlhf.rewards", ["must look like 'path/to/file.py:function'"]),
        (None, "lowmem_rlhf.rewards:target_length(4)", ["arguments must be key=value"]),
        ("def fn(prompts, completions):\n    return []\n", "user.py:fn(size=4)", ["fn does not take these"]),
        ("fn = 3\n", "user.py:fn", ["`fn` in user.py is a int, not a function"]),
    ],
)
def test_load_errors(tmp_path, monkeypatch, source, spec, needles):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "user.py").write_text(source)
    with pytest.raises(UserError) as e:
        load_reward_fn(spec)
    one_line(e, *needles)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            "def fn(a, b):\n    return [0.0] * len(a)\n",
            ["user.py:fn has the wrong signature (a, b)", "fn(prompts, completions, **kwargs)"],
        ),
        ("def fn(prompts, completions, **kw):\n    return [1.0]\n", ["user.py:fn returned 1 scores for 3 completions"]),
        (
            "def fn(prompts, completions, **kw):\n    return 1.0\n",
            ["user.py:fn returned float; it must return a list of 3"],
        ),
        (
            "def fn(prompts, completions, **kw):\n    return [1.0, float('nan'), 2.0]\n",
            ["user.py:fn returned a non-finite score (nan) for prompt 11 (row 12 of data.jsonl)"],
        ),
        (
            "def fn(prompts, completions, **kw):\n    return [1.0, 2.0, 'high']\n",
            ["user.py:fn returned 'high' for prompt 4 (row 5 of data.jsonl)"],
        ),
        (
            "def fn(prompts, completions, answer, **kw):\n    return [1 / 0 for _ in prompts]\n",
            ["user.py:fn raised ZeroDivisionError: division by zero", "row 1 of data.jsonl"],
        ),
    ],
)
def test_call_errors(tmp_path, monkeypatch, body, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.py").write_text(body)
    f = load_reward_fn("user.py:fn")
    with pytest.raises(UserError) as e:
        f.check_call(["answer"])
        f(
            ["a", "b", "c"],
            ["x", "y", "z"],
            [[1], [2], [3]],
            {"answer": ["1", "2", "3"]},
            [f"prompt {i} (row {i + 1} of data.jsonl)" for i in (0, 11, 4)],
        )
    one_line(e, *needles)


# ----------------------------------------------------------------------------------------------------
# the functions' scores reach the advantages exactly


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("rewards") / "run"
    sft.run(config_from_dict(tiny_recipe(out)))
    return out


REWARDS_PY = """
def length_bonus(prompts, completions, completion_ids, bonus, **kwargs):
    return [len(ids) + b for ids, b in zip(completion_ids, bonus)]

def not_first(prompts, completions, **kwargs):
    return [None if j % 3 == 0 else 1.0 for j in range(len(prompts))]
"""


@pytest.mark.parametrize(
    ("advantage", "expected"),
    [
        # scores (w = 2, 1): prompt A (bonus 0.5, lengths 1, 2, 4): 2*1.5 + 0, 2*2.5 + 1, 2*4.5 + 1 = 3, 6, 10;
        # prompt B (bonus 0, lengths 3, 3, 6): 6 + 0, 6 + 1, 12 + 1 = 6, 7, 13. KL is 0 (policy = reference).
        # RLOO: each minus the mean of the other two.
        ("rloo", {"A": [3 - 8, 6 - 6.5, 10 - 4.5], "B": [6 - 10, 7 - 9.5, 13 - 6.5]}),
        # GRPO: (s - mean) / (unbiased std + 1e-4); A: mean 19/3, std 3.5118846; B: mean 26/3, std 3.7859389
        ("grpo", {"A": [-0.949131, -0.094913, 1.044044], "B": [-0.704342, -0.440214, 1.144556]}),
    ],
)
def test_function_scores_give_hand_computed_advantages(sft_run, tmp_path, monkeypatch, advantage, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS_PY)
    pc = PPOConfig(
        advantage=advantage,
        group_size=3,
        rollout_batch_size=2,
        kl_coef=0.0,
        reward_model=False,
        reward_funcs=["my_rewards.py:length_bonus", "my_rewards.py:not_first"],
        reward_weights=[2.0, 1.0],
    )
    model, tok = load_base(ModelConfig(device="cpu"))
    bank = ppo.build_rl_bank(model, sft_run / "sft", None, pc, False, LoRAConfig(r=8))
    assert set(bank.roles) == {"policy", "reference"}  # no reward role without a reward model
    rows = [{"prompt": "What is 2 plus 3?", "bonus": 0.5}, {"prompt": "What does a cow say?", "bonus": 0.0}]
    prompts = [encode_prompt(tok, to_messages(r["prompt"], "row", "prompt")) for r in rows]
    lengths = {"A": [1, 2, 4], "B": [3, 3, 6]}
    word = tok.convert_tokens_to_ids(tok.tokenize("moo"))[0]

    def fixed_generate(bank, role, batch, *args, **kwargs):  # a known rollout: responses of given lengths
        seen: dict[str, int] = {}
        out = []
        for p in batch:
            key = "A" if p == prompts[0] else "B"
            n = lengths[key][seen.setdefault(key, 0)]
            seen[key] += 1
            out.append([word] * (n - 1) + [tok.eos_token_id])
        return Generation(list(batch), out, [True] * len(out))

    monkeypatch.setattr(ppo_module, "generate", fixed_generate)
    trainer = PPOTrainer(
        bank=bank,
        pc=pc,
        stage_dir=tmp_path / "ppo",
        prompts=prompts,
        prompt_texts=[r["prompt"] for r in rows],
        tokenizer=tok,
        seed=0,
        settings={},
        reward_stats=None,
        chunk_size=1024,
        reward_fns=load_reward_fns(pc.reward_funcs),
        prompt_columns=prompt_columns(rows),
        prompt_source="rows",
    )
    ro = trainer.rollout(0)
    assert ro.raw_scores is None and torch.equal(ro.kl, torch.zeros_like(ro.kl))
    got = {"A": [], "B": []}
    for j, i in enumerate(ro.prompt_index):
        got["AB"[i]].append(ro.advantages[j, : int(ro.response_mask[j].sum())].tolist())
    for key in ("A", "B"):
        for adv, want, n in zip(got[key], expected[key], lengths[key], strict=True):
            assert adv == pytest.approx([want] * n, abs=1e-5), (key, got)
    # logged per function: mean and std of the scores that apply, and how many were None
    m = trainer.rollout_metrics(ro)
    assert m["reward/length_bonus/mean"] == pytest.approx((1.5 + 2.5 + 4.5 + 3 + 3 + 6) / 6)
    assert m["reward/length_bonus/std"] == pytest.approx(
        torch.tensor([1.5, 2.5, 4.5, 3, 3, 6.0]).std(correction=0).item()
    )
    assert (m["reward/not_first/mean"], m["reward/not_first/std"], m["reward/not_first/none"]) == (1.0, 0.0, 2)
    assert m["reward/length_bonus/none"] == 0 and "reward_raw" not in m


# ----------------------------------------------------------------------------------------------------
# reward_model: false -> no reward role, no rm stage, a fresh critic; `estimate` drops the reward role


def no_rm_recipe(out, **ppo_keys) -> dict:
    data = tiny_recipe(out)
    data["stages"] = ["sft", "ppo"]
    data["ppo"] = {
        "dataset": "builtin:tiny/prompts.jsonl",
        "reward_model": False,
        "reward_funcs": ["lowmem_rlhf.rewards:answer_match"],
        "judges": ["lowmem_rlhf.tiny.judge:gold"],
        "num_steps": 2,
        "rollout_batch_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 4,
        "max_new_tokens": 12,
        "save_steps": 0,
        **ppo_keys,
    }
    return data


def test_without_reward_model(sft_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    seen = {}
    real_run = PPOTrainer.run

    def spy(self):
        seen["roles"] = set(self.bank.roles)
        seen["value"] = {k: v.clone() for k, v in self.bank.state_dict("value").items()}
        return real_run(self)

    monkeypatch.setattr(PPOTrainer, "run", spy)
    out = ppo.run(config_from_dict(no_rm_recipe(run)))  # gae with a separate critic; no rm stage in this run
    assert seen["roles"] == {"policy", "reference", "value"}
    # the critic starts fresh: LoRA B matrices at zero (its output equals the base's) and a new value head
    fresh = seen["value"]
    assert all(not v.any() for k, v in fresh.items() if "lora_B" in k) and "head.linear.weight" in fresh
    rows = read_metrics(out / "metrics.jsonl")
    assert all("reward/answer_match/mean" in r and "gold" in r and "reward_raw" not in r for r in rows)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert "reward" not in sample and set(sample["reward_funcs"]) == {"answer_match"} and "gold" in sample
    assert (out / "value" / "head.safetensors").is_file()

    # compare ranks this run's policies by its judge alone; the training curve shows the optimised score
    cc = CompareConfig(
        prompts="builtin:tiny/prompts_heldout.jsonl",
        num_prompts=4,
        max_new_tokens=8,
        judge="lowmem_rlhf.tiny.judge:gold",
    )
    report = compare.compare_runs([run], cc, 0, tmp_path / "compare")
    assert report["order"] == ["run/sft", "run/ppo"]
    policy = report["policies"]["run/ppo"]
    assert policy["reward"] is None and policy["win_rate_reward"] is None and policy["gold"] is not None
    assert [
        step
        for step, _ in compare.training_curves(compare.build_policies([compare.open_run(run)], None)[0][1])["reward"]
    ] == [1, 2]

    # the estimate holds two adapters where a reward model makes three, and no score head
    cfg = config_from_dict(no_rm_recipe(run, advantage="grpo", group_size=2))
    with_rm = config_from_dict(no_rm_recipe(run, advantage="grpo", group_size=2, reward_model=True))
    shape, _ = resolve_shape(cfg.model.name_or_path)
    items = dict(estimate_stage(cfg, shape, "ppo").items)
    items_rm = dict(estimate_stage(with_rm, shape, "ppo").items)
    assert items["score/value heads"] == 0 and items_rm["score/value heads"] > 0
    adapter = items_rm["LoRA adapters (fp32): policy, reference, reward"] / 3
    assert items["LoRA adapters (fp32): policy, reference"] == 2 * adapter


def test_estimate_cli_drops_reward_role(tmp_path, capsys):
    recipe = tmp_path / "no_rm.yaml"
    recipe.write_text(yaml.safe_dump(no_rm_recipe(tmp_path / "run", advantage="grpo", group_size=2)))
    assert main(["estimate", str(recipe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["stages"]) == ["sft", "ppo"]
    assert not any("reward" in k for k in report["stages"]["ppo"]["items"])
    assert main(["estimate", str(recipe), "ppo.reward_model=true", "--json"]) == 0
    with_rm = json.loads(capsys.readouterr().out)["stages"]["ppo"]["items"]
    assert "LoRA adapters (fp32): policy, reference, reward" in with_rm


def test_recipe_needs_a_reward_source_and_matching_weights(tmp_path):
    with pytest.raises(UserError, match="`ppo.reward_model` is false and `reward_funcs` is empty"):
        config_from_dict(no_rm_recipe(tmp_path, reward_funcs=[]))
    with pytest.raises(UserError, match="`ppo.reward_weights` has 2 weights for 1 reward functions"):
        config_from_dict(no_rm_recipe(tmp_path, reward_weights=[1.0, 2.0]))


# ----------------------------------------------------------------------------------------------------
# through the CLI: one line, exit 2, earlier checkpoints intact; mid-training the progress is kept


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # this checkout, from another folder
    return subprocess.run(
        [sys.executable, "-m", "lowmem_rlhf", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


FLAKY_PY = """
calls = 0

def flaky(prompts, completions, **kwargs):
    global calls
    calls += 1
    return [float(len(c)) if calls < 2 else float("inf") for c in completions]
"""


def test_cli_errors_keep_checkpoints_and_resume(sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    sft_bytes = (run / "sft" / "adapter_model.safetensors").read_bytes()
    data = no_rm_recipe(run, advantage="grpo", group_size=2, num_steps=3, save_steps=1, reward_funcs=["rules.py:flaky"])
    data["model"]["device"] = "cpu"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))

    # an import error inside the file: found before the model loads
    (tmp_path / "rules.py").write_text("import numpyy\n" + FLAKY_PY)
    line = error_line(run_cli("ppo", str(recipe), cwd=tmp_path))
    assert "rules.py:flaky" in line and "ModuleNotFoundError" in line and "numpyy" in line
    assert not (run / "ppo" / "checkpoints").exists()

    # a non-finite score at step 2: step 1's checkpoint is kept and the message says how to resume
    (tmp_path / "rules.py").write_text(FLAKY_PY)
    line = error_line(run_cli("ppo", str(recipe), cwd=tmp_path))
    assert "rules.py:flaky returned a non-finite score (inf) for prompt" in line
    assert "ppo step 2/3" in line and "step-0000001" in line and "re-run the same command to resume" in line
    assert [p.name for p in (run / "ppo" / "checkpoints").iterdir()] == ["step-0000001"]
    assert (run / "sft" / "adapter_model.safetensors").read_bytes() == sft_bytes
    assert json.loads((run / "manifest.json").read_text())["stages"].keys() == {"sft"}

    # fixed, the same command resumes from step 1 and finishes
    (tmp_path / "rules.py").write_text(FLAKY_PY.replace("calls < 2", "True"))
    proc = run_cli("ppo", str(recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr + proc.stdout
    assert [r["step"] for r in read_metrics(run / "ppo" / "metrics.jsonl")] == [1, 2, 3]
    assert math.isfinite(read_metrics(run / "ppo" / "metrics.jsonl")[-1]["reward"])
    assert (run / "sft" / "adapter_model.safetensors").read_bytes() == sft_bytes


def test_validate_loads_the_functions(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(config_to_dict(config_from_dict(no_rm_recipe(tmp_path / "run", reward_funcs=["nope.py:f"]))))
    )
    assert main(["validate", str(recipe)]) == 2
    assert "reward function nope.py:f: file nope.py not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# a length-only rule moves the response length the way it asks


@pytest.mark.parametrize(("target", "direction"), [(2, -1), (16, +1)])
def test_length_rule_moves_response_length(sft_run, tmp_path, target, direction):
    """GRPO on `target_length` alone, 6 iterations from a ~9-token SFT policy (max 16 new tokens).

    The mean length of the last two rollouts must move at least 2 tokens from the first rollout's towards
    the target. Measured with PPO seeds 1, 2, 3, 4 and 7 (this test's): asked for 2 tokens, shorter by 4.2
    to 6.6 tokens (6.6 at seed 7); asked for 16, longer by 2.7 to 6.0 (4.1 at seed 7). One rollout's mean
    over 32 samples varies by about half a token, so 2 is well above noise and below every measured move.
    """
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    data = no_rm_recipe(
        run,
        advantage="grpo",
        group_size=4,
        reward_funcs=[f"lowmem_rlhf.rewards:target_length(target={target})"],
        judges=[],
        num_steps=6,
        rollout_batch_size=8,
        mini_batch_size=16,
        micro_batch_size=16,
        learning_rate=2e-3,
        max_new_tokens=16,
        kl_coef=0.0,
    )
    rows = read_metrics(ppo.run(config_from_dict(data)) / "metrics.jsonl")
    first, last = rows[0]["response_length"], (rows[-1]["response_length"] + rows[-2]["response_length"]) / 2
    assert direction * (last - first) > 2.0, [r["response_length"] for r in rows]
    # the function's own mean rises towards 0 (its maximum, at the target length)
    assert rows[-1]["reward/target_length/mean"] > rows[0]["reward/target_length/mean"]
