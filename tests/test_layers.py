"""The layer rules of CONTRIBUTING.md, checked by import-linter (contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept() -> None:
    """No import cycles; ir imports nothing above it; passes never import lower/emit/measure; lower never passes."""
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), f"{lint} missing: install the test extra (pip install -e '.[test]')"  # precondition
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "5 kept, 0 broken" in run.stdout, run.stdout[-3000:]  # every contract was read and checked
