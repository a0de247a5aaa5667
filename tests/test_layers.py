"""Imports point down only: every module's imports (read with ast, lazy ones inside functions included)
follow the layers below, so a lower layer never depends on a higher one or on the bundled task.

    cli, __main__                                  commands
    stages                                         sft, rm, ppo, dpo, compare, export (+ their shared `common`)
    rollout, train                                 generation; the loops, checkpoints, metrics
    model                                          the base, the adapter bank, heads, forward passes, memory
    config, estimators, data, rewards              recipes; the estimator registry; data; reward-function loading
    errors, ops, builtins, logs, distributed,      the error type, pure math, `builtin:` names, console logging,
    progress, cache                                the data-parallel processes, progress bars and lines, the cache

A module may import its own package, any package of a lower layer, and another package of its own layer.
`tiny` (the bundled task) and `smollm2` (the bundled real model) are plugins: each may import up to
rollout/train, as a user's files may, and no
module of the package imports it (it registers its `builtin:` model and data through the
`lowmem_rlhf.builtins` entry point, and its gold judge is named as a string in recipes). A stage imports
no other stage, only `stages.common`.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowmem_rlhf"
LAYERS = [
    ("errors", "ops", "builtins", "logs", "distributed", "progress", "cache"),
    ("config", "estimators", "data", "rewards"),
    ("model",),
    ("rollout", "train"),
    ("stages",),
    ("cli", "__main__"),
]
PLUGINS = {"tiny": 3, "smollm2": 3}  # the highest layer a plugin may import
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def parts(module: str) -> tuple[str, str]:
    """`lowmem_rlhf.stages.ppo` -> ("stages", "ppo"); the package root -> ("", "")."""
    names = module.split(".")[1:] + ["", ""]
    return names[0], names[1]


def module_name(path: Path) -> str:
    names = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of lowmem_rlhf in the file, relative ones resolved, plus the
    modules named to `import_module` / `resources.files`."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base == "lowmem_rlhf":  # `from lowmem_rlhf import x`: x may be a module
                out += [(node.lineno, f"lowmem_rlhf.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("lowmem_rlhf.x") and importlib.resources.files("lowmem_rlhf.x") import too
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "files") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return [(line, m) for line, m in out if m == "lowmem_rlhf" or m.startswith("lowmem_rlhf.")]


def allowed(src_module: str, dst_module: str) -> bool:
    (src, src_sub), (dst, dst_sub) = parts(src_module), parts(dst_module)
    if dst not in RANK and dst not in PLUGINS:
        return True  # the package root (`__version__`, CPU-kernel pinning) or a name from it that is not a module
    if src == dst:
        return src != "stages" or "common" in (src_sub, dst_sub) or "" in (src_sub, dst_sub)
    if dst in PLUGINS:
        return False
    return RANK[dst] <= PLUGINS.get(src, RANK.get(src, -1))


def test_every_package_has_a_layer():
    names = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert sorted(names - {"__init__"} - set(RANK) - set(PLUGINS)) == [], "give it a layer in tests/test_layers.py"


def test_imports_point_down_only():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, dst_module in imports(path):
            if not allowed(module_name(path), dst_module):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {dst_module}")
    order = " -> ".join("/".join(layer) for layer in LAYERS)
    assert bad == [], f"upward imports (allowed direction: {order}; tiny up to rollout/train):\n" + "\n".join(bad)
