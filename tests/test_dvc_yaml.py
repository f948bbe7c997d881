"""dvc.yaml lists, for every stage, each project module its command can import.

A module missing from a stage's deps would let a code change slip past `dvc repro`: the stage
would stay "up to date" while its code changed. This reads the imports with `ast`, following
them transitively (imports inside functions included), and compares with dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from conftest import ROOT

PACKAGE = "tasks"
# Imports that cannot change a stage's outputs, so listing them would only cause needless
# re-runs: config.py imports models.py just to check that pretrain.arch names a real model.
IGNORED_EDGES = {("tasks.config", "tasks.models")}


def imported_modules(path: Path) -> set[str]:
    """Project modules (``tasks.x``) that the file at ``path`` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from tasks import atomic` imports the module tasks.atomic
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if _module_file(name) is not None}


def _module_file(name: str) -> Path | None:
    if not name.startswith(f"{PACKAGE}."):
        return None
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None


def code_closure(module: str) -> set[str]:
    """``module`` and every project module it imports, directly or not, as file paths."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        assert path is not None, name
        imports = {m for m in imported_modules(path) if (name, m) not in IGNORED_EDGES}
        todo += sorted(imports - seen)
    return {name.replace(".", "/") + ".py" for name in seen}


def test_every_stage_lists_all_the_code_it_runs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        command = stage["cmd"]
        assert command.startswith(f"python -m {PACKAGE}."), f"{name}: {command}"
        needed = code_closure(command.split()[2])
        listed = {dep for dep in stage["deps"] if dep.startswith(f"{PACKAGE}/")}
        missing = sorted(needed - listed)
        assert not missing, f"stage {name!r} imports {missing} but dvc.yaml does not list them"
        unused = sorted(listed - needed)
        assert not unused, f"stage {name!r} lists {unused} but never imports them"
