"""Fixtures shared across the test tree.

``digits_checkpoint``: the trained DigitsNet state_dict that ``make demo`` writes to
``recipes/checkpoints/digits.pt``. That folder is not in git, so a fresh checkout (CI) has no
checkpoint; rather than skip the tests that need a *trained* net, the fixture builds one once
per session exactly as ``make demo`` does (``python -m examples.digits --out ...``, one thread,
seed 0, ~10-15 s), in a temporary folder, and reuses the repository's file when it exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_CHECKPOINT = REPO_ROOT / "recipes" / "checkpoints" / "digits.pt"


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a trained DigitsNet state_dict: ``recipes/checkpoints/digits.pt``, built if missing.

    Trained in a child process so the test process keeps its own thread count and RNG state.
    """
    if DIGITS_CHECKPOINT.is_file():
        return DIGITS_CHECKPOINT
    out = tmp_path_factory.mktemp("checkpoints") / "digits.pt"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "examples.digits", "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), f"training the digits checkpoint failed:\n{proc.stderr[-3000:]}"
    return out
