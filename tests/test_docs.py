"""Docs stay true to the code: the API example runs, the README's two commands are the real ones."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_api_example_runs(tiny_path, tmp_path, monkeypatch):
    (block,) = python_blocks(REPO / "docs" / "api.md")
    block = block.replace("/tmp/lowmem-rlhf-example", str(tmp_path))
    scope: dict = {}
    exec(compile(block, "docs/api.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert (tmp_path / "reward" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "reward" / "head.safetensors").is_file()
    assert scope["score"].dtype.is_floating_point and scope["score"].shape == (1,)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("demo.sh", "test.sh"):
        assert "scripts/setup.sh" in (REPO / "scripts" / script).read_text()
