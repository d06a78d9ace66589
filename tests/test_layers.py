"""The import layering (pyproject.toml's import-linter contract, README's Layout section) holds: no module
imports one above it, siblings of a layer never import each other, so there is no import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
_LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def _lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: a copied package is analysed instead of the installed one.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", _LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_package_keeps_its_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("lower, line", [
    ("errors.py", "from . import cli"),  # the bottom layer reaching for the top
    ("loader.py", "from .fuse import fuse"),  # the loop that once ran through lora.fuse
    ("checkpoint.py", "def f():\n    from .toy import held_out"),  # lazy imports count too
    ("chat.py", "from . import demo"),  # siblings of one layer stay independent
])
def test_a_lower_module_importing_a_higher_one_fails(tmp_path, lower, line):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    package = Path(shutil.copytree(ROOT / "mlx_diffusiongemma", tmp_path / "mlx_diffusiongemma",
                                   ignore=shutil.ignore_patterns("toy_model", "__pycache__")))
    module = package / lower
    module.write_text(module.read_text() + f"\n\n{line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
