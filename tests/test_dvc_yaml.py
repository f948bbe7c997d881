"""dvc.yaml lists, for every stage, each project file its command can import.

A module missing from a stage's deps would let a code change slip past `dvc repro`: the stage
would stay "up to date" while its code changed. This reads the imports with `ast`, following
them transitively (imports inside functions included, and the ``__init__.py`` of every package
on the way, which Python runs too), and compares with dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from helpers import ROOT

PACKAGES = ("tasks", "graft")  # the stage entry points and the library they call


def imported_modules(path: Path) -> set[str]:
    """Project modules (``tasks.x``, ``graft.x.y``) that the file at ``path`` imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from graft import atomic` imports the module graft.atomic
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if module_file(name) is not None}


def module_file(name: str) -> Path | None:
    """The file that defines project module ``name`` (a module or a package), if any."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def with_packages(name: str) -> set[str]:
    """``name`` and every package above it: importing graft.data.split runs graft/__init__.py."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def code_closure(module: str) -> set[str]:
    """``module`` and every project file it imports, directly or not, as relative paths."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        assert path is not None, name
        imports = set().union(*(with_packages(m) for m in imported_modules(path) | {name}))
        todo += sorted(imports - seen)
    files = (module_file(name) for name in seen)
    return {str(path.relative_to(ROOT)) for path in files if path is not None}


def test_every_stage_lists_all_the_code_it_runs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        command = stage["cmd"]
        assert command.startswith("python -m tasks."), f"{name}: {command}"
        needed = code_closure(command.split()[2])
        listed = {dep for dep in stage["deps"] if dep.split("/")[0] in PACKAGES}
        missing = sorted(needed - listed)
        assert not missing, f"stage {name!r} imports {missing} but dvc.yaml does not list them"
        unused = sorted(listed - needed)
        assert not unused, f"stage {name!r} lists {unused} but never imports them"


def test_the_closure_follows_packages_and_imports_inside_functions() -> None:
    closure = code_closure("tasks.split")
    assert {"tasks/__init__.py", "tasks/split.py", "graft/__init__.py"} <= closure
    assert {"graft/data/__init__.py", "graft/data/split.py", "graft/data/schemas.py"} <= closure
    assert not any(path.startswith("flows/") for path in closure)
