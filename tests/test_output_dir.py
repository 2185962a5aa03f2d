"""Output folders (issue 11): what effopt may replace, ``--force``, crash recovery, and Ctrl-C.

The rules under test (README, "Output folders"; `effopt.optimizer.emit.writer`):
effopt replaces only a folder it wrote (``.effopt-output`` lists its files), checks the
output location before compiling (exit 2 with the folder and ``--force``), repairs what a
killed run left beside the folder, and maps Ctrl-C to exit 130 with the old output intact.

The CLI tests run the real ``effopt`` script in a subprocess, on a tiny model written next to
the recipe. Its factory touches ``factory_called`` (so a test can prove the compile never
started) and, with ``STALL_AT=load`` or ``STALL_AT=emit``, touches ``stalled`` and sleeps while
loading or while artefacts are being written, so signals land at a known step, not by luck.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import effopt
from effopt.cli import main
from effopt.errors import EmitError
from effopt.optimizer.emit import writer
from effopt.optimizer.emit.writer import MARKER, atomic_dir, check_output_dir, effopt_files, write_marker

EFFOPT_SCRIPT = Path(sys.executable).with_name("effopt")

NET_MODULE = """\
import os
import time
from pathlib import Path

from torch import nn

HERE = Path(__file__).parent


def _stall():
    (HERE / "stalled").touch()
    time.sleep(120)


class Stall(nn.Module):
    '''Identity; a leaf module, so torch.export runs this Python while effopt writes artefacts.'''

    def forward(self, x):
        if os.environ.get("STALL_AT") == "emit" and list(HERE.glob(".out.tmp-*")):
            _stall()
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.stall = Stall()

    def forward(self, x):
        return self.stall(self.fc(x))


def build():
    (HERE / "factory_called").touch()
    if os.environ.get("STALL_AT") == "load":
        _stall()
    return Net()
"""

RECIPE = """\
version: 1
model: {factory: "out_net:build", leaf_modules: [stall]}
inputs: [{name: x, shape: [1, 8]}]
passes: []
output: {formats: [pt2]}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    (tmp_path / "out_net.py").write_text(NET_MODULE)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def effopt_cmd(*args: str | Path) -> list[str]:
    cmd = [str(EFFOPT_SCRIPT)] if EFFOPT_SCRIPT.is_file() else [sys.executable, "-m", "effopt.cli"]
    return [*cmd, *map(str, args)]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STALL_AT")}
    return env | extra


def run_effopt(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(effopt_cmd(*args), cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=180)


def start_stalled(cwd: Path, stall_at: str, *args: str | Path) -> subprocess.Popen[str]:
    """Start ``effopt compile`` and return once it sleeps at ``stall_at``; SIGINT is not inherited as ignored."""
    proc = subprocess.Popen(
        effopt_cmd("compile", *args), cwd=cwd, env=clean_env(STALL_AT=stall_at), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 150
    while not (cwd / "stalled").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"effopt never reached {stall_at}: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def previous_output(folder: Path) -> dict[str, bytes]:
    """A stand-in for an earlier compile's output (marker included); returns its files' bytes."""
    folder.mkdir()
    (folder / "model.pt2").write_bytes(b"previous model")
    (folder / "report.json").write_text('{"report_version": 1, "status": "passed"}\n')
    write_marker(folder)
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n or ".old-" in n)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("effopt: error: output folder"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, f"{word!r} missing from: {proc.stderr}"


# --- 1. effopt replaces only a folder it wrote --------------------------------------------------


def test_a_folder_of_user_files_is_refused_before_compiling(recipe: Path) -> None:
    out = recipe.parent / "out"
    out.mkdir()
    (out / "important.txt").write_text("the user's")

    proc = run_effopt("compile", recipe, "-o", "out", cwd=recipe.parent)

    assert_refused(proc, "out", "important.txt", "--force")
    assert sorted(os.listdir(out)) == ["important.txt"] and (out / "important.txt").read_text() == "the user's"
    assert not (recipe.parent / "factory_called").exists()  # refused before the model was even built
    assert leftovers(recipe.parent) == []


def test_an_existing_regular_file_is_refused(recipe: Path) -> None:
    (recipe.parent / "notes.txt").write_text("the user's")

    proc = run_effopt("compile", recipe, "-o", "notes.txt", cwd=recipe.parent)

    assert_refused(proc, "notes.txt", "is a file, not a folder")
    assert (recipe.parent / "notes.txt").read_text() == "the user's"
    assert leftovers(recipe.parent) == [] and not (recipe.parent / "factory_called").exists()


def test_force_writes_into_a_user_folder_and_keeps_its_files(recipe: Path) -> None:
    out = recipe.parent / "out"
    out.mkdir()
    (out / "important.txt").write_text("the user's")

    proc = run_effopt("compile", recipe, "-o", "out", "--force", cwd=recipe.parent)

    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == [MARKER, "important.txt", "model.pt2", "report.json", "report.md"]
    assert (out / "important.txt").read_text() == "the user's"
    assert effopt_files(out) == ("model.pt2", "report.json", "report.md")  # the marker lists only effopt's files
    assert leftovers(recipe.parent) == []


def test_force_removes_only_files_an_earlier_effopt_run_wrote(recipe: Path) -> None:
    out = recipe.parent / "out"
    out.mkdir()
    (out / "important.txt").write_text("the user's")
    effopt.compile(recipe, output_dir=out, force=True)
    assert (out / "model.pt2").is_file()  # precondition: effopt's pt2 is there

    effopt.compile(json_recipe(recipe, formats=[]), output_dir=out, force=True)

    assert sorted(os.listdir(out)) == [MARKER, "important.txt", "report.json", "report.md"]


def test_an_effopt_folder_is_replaced_as_a_whole(recipe: Path) -> None:
    out = recipe.parent / "out"
    effopt.compile(recipe, output_dir=out)
    marker = (out / MARKER).read_bytes()

    effopt.compile(json_recipe(recipe, formats=[]), output_dir=out)
    effopt.compile(recipe, output_dir=recipe.parent / "again")

    assert sorted(os.listdir(out)) == [MARKER, "report.json", "report.md"]  # the old model.pt2 went with the folder
    assert (recipe.parent / "again" / MARKER).read_bytes() == marker  # the marker is deterministic
    assert marker.decode().splitlines()[0] == "effopt output folder v1"


def test_a_folder_from_effopt_before_the_marker_is_still_replaced(recipe: Path) -> None:
    out = recipe.parent / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    (out / "report.json").write_text(json.dumps({"report_version": 1, "status": "passed"}))

    effopt.compile(recipe, output_dir=out)

    assert sorted(os.listdir(out)) == [MARKER, "model.pt2", "report.json", "report.md"]


def test_the_python_api_refuses_a_user_folder_before_loading_the_model(recipe: Path) -> None:
    out = recipe.parent / "out"
    out.mkdir()
    (out / "important.txt").write_text("the user's")

    with pytest.raises(EmitError, match=r"important\.txt.*--force \(force=True"):
        effopt.compile(recipe, output_dir=out)

    assert not (recipe.parent / "factory_called").exists()


def json_recipe(recipe: Path, formats: list[str]) -> dict:
    """The fixture's recipe as a dict with other ``output.formats`` (its folder stays importable)."""
    return {
        "version": 1,
        "model": {"factory": "out_net:build", "leaf_modules": ["stall"], "pythonpath": [str(recipe.parent)]},
        "inputs": [{"name": "x", "shape": [1, 8]}], "passes": [], "output": {"formats": formats},
    }


# --- 2. a bad output location fails before the compile, with exit 2 ----------------------------


def test_the_current_folder_is_refused(recipe: Path) -> None:
    proc = run_effopt("compile", recipe, "-o", ".", cwd=recipe.parent)

    assert_refused(proc, "output folder .", "current folder", "--force")
    assert leftovers(recipe.parent) == [] and not list(recipe.parent.parent.glob(f".{recipe.parent.name}.tmp-*"))
    assert not (recipe.parent / "factory_called").exists()


def test_a_folder_below_a_regular_file_is_refused(recipe: Path) -> None:
    (recipe.parent / "afile").write_text("x")

    proc = run_effopt("compile", recipe, "-o", "afile/sub", cwd=recipe.parent)

    assert_refused(proc, "afile/sub", "afile is a file, not a folder")
    assert not (recipe.parent / "factory_called").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused(recipe: Path) -> None:
    parent = recipe.parent / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_effopt("compile", recipe, "-o", "ro/out", cwd=recipe.parent)
    finally:
        parent.chmod(0o755)

    assert_refused(proc, "ro/out", "no permission")
    assert not (recipe.parent / "factory_called").exists()


def test_an_unwritable_parent_is_refused_by_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rule where root's permissions would hide it: ``os.access`` says no."""
    monkeypatch.setattr(writer.os, "access", lambda path, mode: Path(path) != tmp_path)

    with pytest.raises(EmitError, match=r"out: cannot create it: no permission to write in"):
        check_output_dir(tmp_path / "out")


# --- 3. a killed run is repaired by the next one -----------------------------------------------


def test_stale_temp_and_old_folders_are_removed(recipe: Path) -> None:
    out, root, pid = recipe.parent / "out", recipe.parent, dead_pid()
    previous_output(out)
    (root / f".out.tmp-{pid}-abcd1234").mkdir()
    (root / f".out.tmp-{pid}-abcd1234" / "model.pt2").write_bytes(b"half")
    (root / ".out.tmp-x7k2m9q1").mkdir()  # the name today's effopt used (no pid)
    previous_output(root / f".out.old-{pid}-abcd1234")

    proc = run_effopt("compile", recipe, "-o", "out", cwd=root)

    assert proc.returncode == 0, proc.stderr
    assert leftovers(root) == []
    assert json.loads((out / "report.json").read_text())["status"] == "passed"


def test_a_lone_old_folder_is_restored_before_compiling(recipe: Path) -> None:
    """A kill between the two renames leaves the good output only as .out.old-*: put it back first."""
    root, pid = recipe.parent, dead_pid()
    before = previous_output(root / f".out.old-{pid}-abcd1234")
    (root / f".out.tmp-{pid}-abcd1234").mkdir()
    recipe.write_text(RECIPE.replace("out_net:build", "out_net:missing"))  # this compile fails (exit 2) ...

    proc = run_effopt("compile", recipe, "-o", "out", cwd=root)

    assert proc.returncode == 2 and "missing" in proc.stderr, proc.stderr
    assert snapshot(root / "out") == before  # ... yet the previous output is back in place
    assert leftovers(root) == []


def test_folders_of_a_live_process_and_user_files_are_left_alone(tmp_path: Path) -> None:
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"  # this test's own process: a compile in progress
    live.mkdir()
    foreign = tmp_path / f".out.old-{dead_pid()}-abcd1234"
    foreign.mkdir()
    (foreign / "important.txt").write_text("the user's")
    previous_output(tmp_path / "out")

    check_output_dir(tmp_path / "out")

    assert live.is_dir() and (foreign / "important.txt").read_text() == "the user's"


def test_kill_9_while_writing_keeps_the_old_output_and_the_next_compile_cleans_up(recipe: Path) -> None:
    out, root = recipe.parent / "out", recipe.parent
    before = previous_output(out)
    proc = start_stalled(root, "emit", recipe, "-o", "out")

    proc.kill()
    proc.communicate(timeout=60)

    assert snapshot(out) == before
    assert [n.split("-")[0] for n in leftovers(root)] == [".out.tmp"]  # precondition: the crash left its temp folder
    assert run_effopt("compile", recipe, "-o", "out", cwd=root).returncode == 0
    assert leftovers(root) == []
    assert json.loads((out / "report.json").read_text())["status"] == "passed"


def test_an_error_inside_the_writer_keeps_the_old_output(tmp_path: Path) -> None:
    before = previous_output(tmp_path / "out")

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out") as staging:
        (staging / "model.pt2").write_bytes(b"half")
        raise KeyboardInterrupt

    assert snapshot(tmp_path / "out") == before and leftovers(tmp_path) == []


def test_sigint_is_held_off_between_the_two_renames() -> None:
    reached = []

    with pytest.raises(KeyboardInterrupt), writer.sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")

    assert reached == ["after the signal"]


# --- 4. Ctrl-C: exit 130, "interrupted", old output intact, no temp folder ----------------------


@pytest.mark.parametrize("stall_at", ["load", "emit"])
def test_ctrl_c_exits_130_and_keeps_the_old_output(recipe: Path, stall_at: str) -> None:
    out, root = recipe.parent / "out", recipe.parent
    before = previous_output(out)
    proc = start_stalled(root, stall_at, recipe, "-o", "out")
    if stall_at == "emit":
        assert leftovers(root), "precondition: the artefacts were being written"

    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip() == "effopt: interrupted"
    assert snapshot(out) == before
    assert leftovers(root) == []


# --- bench and profile-host follow the same rules -----------------------------------------------


def test_bench_never_appends_to_a_report_effopt_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32", '
                                          '"dynamic_batch": true}]}\n')
    (tmp_path / "model.onnx").write_bytes(b"the user's")
    before = snapshot(tmp_path)

    result = CliRunner().invoke(main, ["bench", str(tmp_path), "--profile", "x86-avx2"])

    assert result.exit_code == 2, result.output
    assert "report.json there was not written by effopt compile" in result.stderr
    assert snapshot(tmp_path) == before


def test_profile_host_never_overwrites_a_user_file(tmp_path: Path) -> None:
    (tmp_path / "host.yaml").write_text("my own notes\n")
    (tmp_path / "afile").write_text("x")

    cases = {"host.yaml": "effopt did not write", ".": "is a folder", "afile/host.yaml": "is a file, not a folder"}
    for target, words in cases.items():
        result = CliRunner().invoke(main, ["profile-host", "-o", str(tmp_path / target), "--quick"])
        assert result.exit_code == 2 and words in result.stderr, (target, result.output)
    assert (tmp_path / "host.yaml").read_text() == "my own notes\n"
    assert sorted(os.listdir(tmp_path)) == ["afile", "host.yaml"]


def test_profile_host_replaces_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from effopt.hardware_profiles import host

    (tmp_path / "host.yaml").write_text("# Hardware profile 'host' written by effopt profile-host.\nversion: 1\n")
    real = host.measure_host_details
    monkeypatch.setattr(host, "measure_host_details", lambda threads, quick: real(threads=1, quick=True))

    result = CliRunner().invoke(main, ["profile-host", "-o", str(tmp_path / "host.yaml"), "--quick"])

    assert result.exit_code == 0, result.output
    assert "peak_flops_per_s" in (tmp_path / "host.yaml").read_text()
    assert sorted(os.listdir(tmp_path)) == ["host.yaml"]


def test_readme_states_the_rule() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Output folders", 1)[1].split("\n## ", 1)[0]
    for words in (MARKER, "--force", "exit 2", ".NAME.old-"):
        assert words in section, words
