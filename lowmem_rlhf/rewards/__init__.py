"""Reward functions and judges: Python functions named in a recipe, loaded and called in one place.

A reward function (or a judge, which has the same signature) follows TRL's convention:

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

`prompts` are the prompts' texts (the last user turn), `completions` the decoded responses (special
tokens skipped, whitespace stripped); `kwargs` holds every other column of the prompt rows as lists
aligned with `prompts`, plus `completion_ids` (token ids of each response). `None` means "does not
apply to this sample". A recipe names a function as `"path/to/file.py:function"` (relative to the
working directory) or `"package.module:function"`; `name(key=value, ...)` binds keyword arguments
(literals only), e.g. `"lowmem_rlhf.rewards:target_length(target=12)"`.

Every error a user's function can cause (file or function not found, an import error inside the
file, a signature that cannot take the call, a wrong number of scores, a non-finite score, an
exception inside the function) is a one-line UserError naming the function.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.rewards.builtin import answer_match, regex_match, repetition_penalty, target_length

__all__ = [
    "RewardFunction",
    "answer_match",
    "load_reward_fn",
    "load_reward_fns",
    "regex_match",
    "repetition_penalty",
    "score_samples",
    "target_length",
]

# Keys the samples, reports and metrics already use: a judge's scores are stored under its name beside them.
RESERVED_NAMES = frozenset(
    {
        "step",
        "policy",
        "baseline",
        "prompt",
        "prompt_index",
        "prompt_row",
        "response",
        "length",
        "eos",
        "reward",
        "reward_raw",
        "reward_funcs",
        "score",
        "logp",
        "ref_logp",
        "kl",
        "kl_coef",
        "samples",
        "eos_rate",
        "response_length",
        "reward_length_corr",
        "advantage_std",
        "explained_variance",
        "entropy",
        "clipfrac",
        "approx_kl",
        "pg_loss",
        "value_loss",
        "value_clipfrac",
        "ptx_loss",
        "grad_norm",
        "lr",
        "elapsed_s",
    }
)


def _first_line(e: BaseException) -> str:
    """`Type: message` of an exception, on one line (an error message is one line)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@dataclass
class RewardFunction:
    """A loaded reward function or judge: `name` (its function name) is what logs and reports show."""

    name: str
    spec: str
    fn: Callable = field(repr=False)
    bound: dict = field(default_factory=dict)
    what: str = "reward function"  # or "judge": how error messages call it

    def check_call(self, columns: Sequence[str]) -> None:
        """Refuse, before any model is loaded, a function that cannot take the call it will get."""
        clash = sorted(set(self.bound) & set(columns))
        if clash:
            raise UserError(
                f"{self.what} {self.spec}: argument `{clash[0]}` is bound in the recipe but is also a column of "
                "the prompt rows; rename the column or the argument"
            )
        call = {"prompts": [], "completions": [], "completion_ids": [], **{c: [] for c in columns}}
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return  # a builtin or C callable without an introspectable signature: trust it
        try:
            sig.bind(**call)
        except TypeError as e:
            raise UserError(
                f"{self.what} {self.spec} has the wrong signature {sig} ({e}); it is called as "
                f"fn(prompts=..., completions=..., completion_ids=...{''.join(f', {c}=...' for c in columns)}): "
                "define it as fn(prompts, completions, **kwargs)"
            ) from None

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict[str, list],
        rows: Sequence[str],
    ) -> list[float | None]:
        """Scores of one batch, checked: one per completion, each a finite number or None.

        `rows` names the prompt row of each sample (e.g. "row 12 of prompts.jsonl") for error messages.
        """
        try:
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except UserError:
            raise
        except Exception as e:  # the user's code: any exception is theirs to fix, reported in one line
            raise UserError(
                f"{self.what} {self.spec} raised {_first_line(e)} (on a batch of {len(prompts)} samples, "
                f"the first from {rows[0] if rows else '-'})"
            ) from None
        try:
            out = list(out)
        except TypeError:
            raise UserError(
                f"{self.what} {self.spec} returned {type(out).__name__}; it must return a list of "
                f"{len(prompts)} floats (or None)"
            ) from None
        if len(out) != len(prompts):
            raise UserError(
                f"{self.what} {self.spec} returned {len(out)} scores for {len(prompts)} completions; "
                "return one score (or None) per completion"
            )
        scores: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                scores.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise UserError(
                    f"{self.what} {self.spec} returned {v!r} for {rows[i]}; scores must be numbers or None"
                ) from None
            if not math.isfinite(f):
                raise UserError(
                    f"{self.what} {self.spec} returned a non-finite score ({f}) for {rows[i]}; "
                    "return a finite number, or None where it does not apply"
                )
            scores.append(f)
        return scores


def _parse_spec(spec: str, what: str) -> tuple[str, str, dict]:
    """`"target:attr(k=v, ...)"` -> (target, attr, kwargs); the target may hold ':' (a Windows drive)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"{what} {spec!r} must look like 'path/to/file.py:function' or 'package.module:function'")
    target, _, tail = spec.rpartition(":")
    attr, kwargs = tail.strip(), {}
    if "(" in attr:
        if not attr.endswith(")"):
            raise UserError(f"{what} {spec!r}: arguments must be written as name(key=value, ...)")
        try:
            call = ast.parse(attr, mode="eval").body
            if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
                raise ValueError("only key=value arguments")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
            if len(kwargs) != len(call.keywords):
                raise ValueError("no **arguments")
            attr = call.func.id
        except (SyntaxError, ValueError) as e:
            raise UserError(
                f"{what} {spec!r}: arguments must be key=value with literal values (numbers, strings, "
                f"lists, true/false as True/False): {e}"
            ) from None
    if not target or not attr.isidentifier():
        raise UserError(f"{what} {spec!r} must look like 'path/to/file.py:function' or 'package.module:function'")
    return target.strip(), attr, kwargs


def _import_file(path: Path, spec: str, what: str):
    if not path.is_file():
        raise UserError(
            f"{what} {spec}: file {path} not found (paths are relative to the working directory {Path.cwd()})"
        )
    name = f"lowmem_rlhf_user_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"{what} {spec}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its neighbours, as when run as a script
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"{what} {spec}: importing {path} raised {_first_line(e)}") from None
    finally:
        sys.path.remove(folder)
    return module


def _import_module(target: str, spec: str, what: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise UserError(
                f"{what} {spec}: no module named {e.name!r}; give an importable module, or a file as "
                "'path/to/file.py:function'"
            ) from None
        raise UserError(f"{what} {spec}: importing {target} raised {_first_line(e)}") from None
    except Exception as e:
        raise UserError(f"{what} {spec}: importing {target} raised {_first_line(e)}") from None


def load_reward_fn(spec: str, what: str = "reward function") -> RewardFunction:
    """Load `"file.py:function"` or `"package.module:function"` (optionally `function(key=value, ...)`)."""
    target, attr, kwargs = _parse_spec(spec, what)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target), spec, what)
    else:
        module = _import_module(target, spec, what)
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"{what} {spec}: {target} has no function `{attr}`")
    if not callable(fn):
        raise UserError(f"{what} {spec}: `{attr}` in {target} is a {type(fn).__name__}, not a function")
    if kwargs:
        try:
            inspect.signature(fn).bind_partial(**kwargs)
        except TypeError as e:
            raise UserError(f"{what} {spec}: {attr} does not take these arguments ({e})") from None
        except ValueError:
            pass
        fn = functools.partial(fn, **kwargs)
    return RewardFunction(attr, spec, fn, kwargs, what)


def load_reward_fns(specs: Sequence[str], what: str = "reward function") -> list[RewardFunction]:
    """Load every spec; names must be distinct, and a judge's must not shadow a key the samples already use
    (reward functions are logged under `reward/<name>/...` and stored under `reward_funcs`)."""
    fns = [load_reward_fn(s, what) for s in specs]
    seen: dict[str, str] = {}
    for f in fns:
        if f.name in seen:
            raise UserError(
                f"two {what}s are named {f.name!r} ({seen[f.name]} and {f.spec}); logs and reports show them by "
                "name, so give one another name (e.g. a one-line wrapper in your own file)"
            )
        if what == "judge" and f.name in RESERVED_NAMES:
            raise UserError(
                f"{what} {f.spec}: the name {f.name!r} is already a column of the samples and reports; "
                "wrap it under another name"
            )
        seen[f.name] = f.spec
    return fns


def score_samples(
    fns: Sequence[RewardFunction],
    prompt_texts: Sequence[str],
    columns: dict[str, list],
    index: Sequence[int],
    completions: list[str],
    completion_ids: list[list[int]],
    source: str,
) -> dict[str, list[float | None]]:
    """{name: one score (or None) per sample} of every function; sample j answers prompt row `index[j]`."""
    if not fns:
        return {}
    prompts = [prompt_texts[i] for i in index]
    cols = {k: [v[i] for i in index] for k, v in columns.items()}
    rows = [f"prompt {i} (row {i + 1} of {source})" for i in index]
    return {f.name: f(prompts, completions, completion_ids, cols, rows) for f in fns}
