"""docs/architecture.md stays true: each module imports only what its row allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import ROOT

SRC = ROOT / "src" / "mailfeed"
DOC = ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| `(?P<module>[a-z0-9_]+)(?:\.\*)?` \|[^|]*\| (?P<allowed>[^|]*) \|$")


def allowed_imports() -> dict[str, set[str] | None]:
    """Return module -> the mailfeed modules it may import (None: anything)."""
    table: dict[str, set[str] | None] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line.strip())
        if not match:
            continue
        text = re.sub(r"\([^)]*\)", "", match["allowed"]).strip()
        if text == "everything":
            table[match["module"]] = None
        elif text.startswith("nothing") or not text:
            table[match["module"]] = set()
        else:
            table[match["module"]] = {word.strip().split(".")[0] for word in text.split(",")}
    return table


def top_module(path: Path) -> str:
    relative = path.relative_to(SRC)
    return relative.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Return the top-level mailfeed modules that one source file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("mailfeed."):
                found.add(node.module.split(".")[1])
            elif node.level == 0 and node.module == "mailfeed":
                found.update(alias.name for alias in node.names)
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mailfeed."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_has_a_row() -> None:
    table = allowed_imports()
    modules = {top_module(p) for p in SRC.rglob("*.py")} - {"__init__"}
    missing = sorted(modules - set(table))
    assert missing == [], f"modules without a row in {DOC.name}: {missing}"


def test_imports_follow_the_table() -> None:
    table = allowed_imports()
    wrong: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        module = top_module(path)
        allowed = table.get(module)
        if module == "__init__" or allowed is None:
            continue
        # Every layer may import errors; the document states this rule.
        extra = imported_modules(path) - allowed - {module, "__version__", "errors"}
        if extra:
            wrong.append(f"{path.relative_to(SRC)} imports {sorted(extra)}")
    assert wrong == []


def test_table_parser_reads_rows() -> None:
    table = allowed_imports()
    assert table["envelope"] == set()
    assert table["cli"] is None
    assert "spool" in (table["fwd"] or set())
