"""`graft run` and `graft serve` find the project's flows/ under --root, or say clearly why not."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run

from graft.cli.main import use_project_code
from graft.errors import GraftError


@pytest.mark.parametrize("command", ["run", "serve"])
def test_outside_a_project_root_is_one_clear_line(command: str, tmp_path: Path) -> None:
    result = run(["graft", command, "--root", str(tmp_path)], cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "is not a graft project root (no flows/pipeline.py)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_project_root_goes_on_the_import_path_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(ROOT)])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    use_project_code(ROOT)
    use_project_code(ROOT)
    assert sys.path.count(str(ROOT)) == 1 and sys.path[0] == str(ROOT)
    # Flow-run processes started from here inherit the root ahead of what was there.
    assert os.environ["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/elsewhere"])
    with pytest.raises(GraftError, match="not a graft project root"):
        use_project_code(ROOT / "graft")
