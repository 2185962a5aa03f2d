"""Fixtures shared across the test tree.

``digits_checkpoint``: the trained DigitsNet state_dict that ``make demo`` writes to
``recipes/checkpoints/digits.pt``. That folder is not in git, so a fresh checkout (CI) has no
checkpoint; rather than skip the tests that need a *trained* net, the fixture builds one once
per session exactly as ``make demo`` does (``python -m examples.digits --out ...``, one thread,
seed 0, ~10-15 s), in a temporary folder, and reuses the repository's file when it exists.

``one_thread``: one intra-op thread for a module that asks with
``pytestmark = pytest.mark.usefixtures("one_thread")`` (not autouse: other modules keep torch's count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the module that asks, restored after its last test.

    For modules of tiny models (finetune, factorization): on a busy 2-core machine two OpenMP
    threads mostly wait for each other (~75 s vs ~11 s measured for test_finetune.py under load).
    Example: with 2 threads before, ``torch.get_num_threads()`` is 1 inside the module and 2 after it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
