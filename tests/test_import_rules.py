"""Every import between the project's packages follows ARCHITECTURE.md's "may import" table.

The rules are read from the table itself, so the document and this test cannot drift apart. Every import statement
counts, lazy ones inside functions included: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO_ROOT

TABLE_HEADING = "## Packages and who may import whom"
EVERYTHING = "everything"


def may_import_table() -> dict[str, set[str] | None]:
    """Package (dotted, e.g. `training.synthetic`) → the first-party packages it may import; None: any."""
    text = (REPO_ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table: dict[str, set[str] | None] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        package = cells[0].strip("`").rstrip("/").replace("/", ".")
        allowed = cells[-1]
        table[package] = None if allowed.startswith(EVERYTHING) else set(re.findall(r"`([\w./]+)`", allowed))
    return table


def owner(module: str, packages: set[str]) -> str | None:
    """The table row a dotted module belongs to: its longest package prefix; None for a third-party module."""
    matches = [package for package in packages if module == package or module.startswith(package + ".")]
    return max(matches, key=len) if matches else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, at any depth of the syntax tree."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def package_files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package.replace(".", "/")).rglob("*.py"))


def allowed(source: str, target: str, table: dict[str, set[str] | None]) -> bool:
    """A package may import itself and its sub-packages, and what its row names (a named package's sub-packages too)."""
    rule = table[source]
    if rule is None or target == source or target.startswith(source + "."):
        return True
    return any(target == name or target.startswith(name + ".") for name in rule)


def test_the_table_names_the_packages_and_their_rules() -> None:
    table = may_import_table()
    assert set(table) == {
        "fedlesion", "models", "models.federation", "dicom_gateway", "inference", "training", "training.synthetic",
    }  # fmt: skip
    assert table["fedlesion"] is None and table["models"] == set()
    assert table["inference"] == {"models", "dicom_gateway"}
    assert table["models.federation"] == {"models"}


def test_every_import_between_packages_is_one_the_table_allows() -> None:
    table = may_import_table()
    packages = set(table)
    arrows = []
    for package in packages:
        for path in package_files(package):
            if owner(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts), packages) != package:
                continue  # a sub-package's file follows the sub-package's row
            for line, module in imports(path):
                target = owner(module, packages)
                if target is not None and not allowed(package, target, table):
                    arrows.append(f"{path.relative_to(REPO_ROOT)}:{line}: {package} -> {module}")
    assert not arrows, "imports that ARCHITECTURE.md does not allow:\n" + "\n".join(sorted(arrows))


def test_nothing_below_the_cli_imports_it() -> None:
    below = [package for package in may_import_table() if package != "fedlesion"]
    upward = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {module}"
        for package in below
        for path in package_files(package)
        for line, module in imports(path)
        if module.split(".")[0] == "fedlesion"
    ]
    assert not upward, "\n".join(upward)


def test_the_checker_sees_lazy_imports_and_refuses_an_arrow_the_table_lacks(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def later():\n    from inference.jobs import JobQueue\n    import fedlesion.settings\n")
    table = may_import_table()
    targets = [owner(name, set(table)) for _, name in imports(module)]
    assert targets == ["inference", "fedlesion"]
    assert not allowed("dicom_gateway", "inference", table) and not allowed("models", "fedlesion", table)
    assert allowed("inference", "dicom_gateway", table) and allowed("training", "training.synthetic", table)
