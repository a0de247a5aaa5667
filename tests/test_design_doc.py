"""docs/design.md is the document the code cites: every `pitfall N` in the code, tests, benchmarks and docs has
its numbered entry there, every test an entry names exists, and nothing cites a design file the repository
does not hold."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
SCANNED = ("lowmem_rlhf", "tests", "benchmarks", "docs", "recipes", "scripts", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}
# "pitfall 3", "pitfalls 1 and 6", "pitfalls 2, 8, 9, 10 and 11"
CITATION = re.compile(r"\bpitfalls?\s+(\d+(?:\s*(?:,|and|&)\s*\d+)*)", re.I)
OUTSIDE_DOC = "DESIGN" + ".md"  # spelt in two pieces so this file does not cite it


def text_files() -> list[Path]:
    out = []
    for name in SCANNED:
        path = REPO / name
        paths = [path] if path.is_file() else sorted(path.rglob("*"))
        out += [p for p in paths if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return out


def design_entries() -> dict[int, str]:
    """{N: text of entry N} of the numbered list under the "Pitfalls" heading."""
    text = DESIGN.read_text()
    section = re.search(r"^## Pitfalls.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "docs/design.md has no '## Pitfalls' section"
    parts = re.split(r"^(\d+)\. ", section.group(1), flags=re.M)
    return {int(n): body for n, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_cited_pitfall_has_its_entry():
    entries = design_entries()
    assert sorted(entries) == list(range(1, len(entries) + 1)), "pitfalls are numbered 1, 2, 3, ... in order"
    missing = []
    for path in text_files():
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for m in CITATION.finditer(line):
                for n in map(int, re.findall(r"\d+", m.group(1))):
                    if n not in entries:
                        missing.append(f"{path.relative_to(REPO)}:{lineno} cites pitfall {n}")
    assert missing == [], "no such entry in docs/design.md:\n" + "\n".join(missing)


def test_every_pitfall_names_tests_that_exist():
    for n, body in design_entries().items():
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", body)
        assert refs, f"pitfall {n} names no test (`tests/test_x.py::test_name`)"
        for file, name in refs:
            path = REPO / file
            assert path.is_file(), f"pitfall {n}: {file} does not exist"
            assert re.search(rf"^\s*def {name}\(", path.read_text(), flags=re.M), f"pitfall {n}: no {file}::{name}"


def test_design_doc_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", DESIGN.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (DESIGN.parent / target).exists(), f"docs/design.md links to {target}, which does not exist"


def test_nothing_cites_a_design_file_outside_the_repository():
    citing = [str(p.relative_to(REPO)) for p in text_files() if OUTSIDE_DOC in p.read_text(errors="replace")]
    assert citing == [], f"these files cite {OUTSIDE_DOC}; the design document is docs/design.md"
