"""The README's Layout names every module of the package, and no two modules of different layers share a file name
(detect/probe_*.py implement the probes; probes/*.py are their pure tensor computations)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> dict[str, set[str]]:
    """Folder (relative to critsample/) -> module file names listed under it in the README's Layout block."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("\ncritsample/\n") :]
    block = block[: block.index("```")]
    listed: dict[str, set[str]] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines()[2:]:
        m = re.match(r"^( +)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        folder = "/".join(n for _, n in stack)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
        elif name.endswith(".py"):
            listed.setdefault(folder, set()).add(name)
    return listed


def test_readme_layout_lists_every_module():
    listed, pkg = _layout(), ROOT / "critsample"
    missing = []
    for p in sorted(pkg.rglob("*.py")):
        folder = "" if p.parent == pkg else p.parent.relative_to(pkg).as_posix()
        if p.name != "__init__.py" and p.name not in listed.get(folder, set()):
            missing.append(p.relative_to(pkg).as_posix())
    assert not missing, f"README Layout omits {missing}"


def test_probe_modules_and_tensor_modules_have_distinct_names():
    detect = {p.name for p in (ROOT / "critsample" / "detect").glob("*.py")}
    probes = {p.name for p in (ROOT / "critsample" / "probes").glob("*.py")} - {"__init__.py"}
    assert not detect & probes, detect & probes
