"""Imports run one way (pyproject's [tool.importlinter] contracts): checked here, so `make test` enforces it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lint-imports")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from importlinter.cli import "
                                                                      "lint_imports_command as c; c()"]
    env = dict(os.environ)
    if pythonpath is not None:  # ahead of the editable install's path
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd + ["--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_against_the_direction_breaks_them(tmp_path):
    """A copy of the package in which the SSD core imports the engine fails lint-imports."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "saguaro", src / "saguaro", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    fanout = src / "saguaro" / "ssd" / "fanout.py"
    fanout.write_text(fanout.read_text() + "\nfrom saguaro.engine.base import Engine  # noqa: E402,F401\n")
    result = lint_imports(tmp_path, pythonpath=src)
    assert result.returncode != 0, result.stdout
    assert "saguaro.ssd.fanout -> saguaro.engine.base" in result.stdout
    assert "never import the engine" in result.stdout and "BROKEN" in result.stdout
