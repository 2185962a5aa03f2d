"""The artefact writer: where effopt may write, and writing there atomically and recoverably.

Rules (the README's "Output folders" section says the same to users):

* effopt replaces only a folder it wrote itself. Every output folder gets a marker
  file, ``.effopt-output``, listing the files effopt put there. A folder is effopt's
  when its marker lists everything in it (or, for folders written before the
  marker existed, when it holds only artefact names and effopt's own
  ``report.json``). An absent or empty folder is fine too. Anything else (a user's
  folder, a regular file, the current folder) is refused before the compile
  starts, with `EmitError` (exit 2) naming the folder and ``--force``.
* ``force=True`` writes effopt's files into a folder it does not own, one file
  at a time; it replaces only files with the names effopt writes, and removes
  only files a previous effopt run listed in the marker. It never removes a
  folder, and never replaces a regular file with a folder.
* The swap is crash-safe: artefacts are written to ``.NAME.tmp-<pid>-<rand>``
  beside the target; the old folder is renamed to ``.NAME.old-<pid>-<rand>``,
  the new one renamed into place, then the old one removed. SIGINT is held off
  during the two renames. Whatever a ``kill -9`` leaves is repaired by the next
  run for the same target (`recover`): a ``.old`` folder whose target is missing
  is renamed back; stale ``.tmp`` and ``.old`` folders of dead processes are
  removed (an ``.old`` one only when it is effopt's or empty).

Example: ``out/`` holds ``.effopt-output`` (listing ``model.onnx``, ``report.json``,
``report.md``) and those three files, so ``effopt compile r.yaml -o out`` replaces
it; after ``echo hi > out/notes.txt`` the same command exits 2 and names
``notes.txt`` and ``--force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from effopt.errors import EmitError

MARKER = ".effopt-output"
MARKER_HEADER = "effopt output folder v1"
MARKER_COMMENT = (
    "# Written by effopt compile, with the files it wrote here (one a line). effopt replaces this folder on the\n"
    "# next compile to it only while it holds nothing else; see 'Output folders' in effopt's README.\n"
)
#: What effopt compile writes into an output folder (besides the marker); an earlier effopt wrote no marker,
#: so a folder holding only these names and effopt's own report.json counts as effopt's.
ARTEFACT_NAMES = ("model.pt2", "model_int8.pt", "model.onnx", "model_float.onnx", "model.h", "report.json", "report.md",
                  "measurements.json", "model_aoti.pt2")
FORCE_HINT = "pass --force (force=True in Python) to write effopt's files into it without removing anything"


@dataclass(frozen=True)
class OutputCheck:
    """Where a compile will write and how.

    ``mode`` is ``replace`` (the folder is absent, empty or effopt's: one atomic
    swap) or ``merge`` (``--force`` into a folder effopt does not own: effopt's
    files are moved in one by one). ``previous`` lists the files an earlier effopt
    run recorded in the folder's marker, which a merge may remove when this run
    no longer writes them.
    """

    target: Path
    mode: Literal["replace", "merge"]
    previous: tuple[str, ...] = ()


def check_output_dir(path: str | Path, force: bool = False) -> OutputCheck:
    """Check, before any work, that effopt may write its output folder at ``path``; repair crash leftovers.

    Raises `EmitError` (exit 2) with the folder, the reason and what to do, e.g.
    ``output folder out: it holds files effopt did not write (important.txt); ...``.
    """
    shown = str(path)
    absolute = Path(os.path.abspath(path))
    if absolute.name == "":
        raise EmitError(f"output folder {shown}: is the file-system root; choose a folder such as ./out")
    target = Path(os.path.realpath(absolute))  # a symlink to a folder: the folder it points to
    cwd = Path(os.path.realpath(os.getcwd()))
    inside = target == cwd or target in cwd.parents
    if inside and not force:
        raise EmitError(
            f"output folder {shown}: is the current folder{'' if target == cwd else ' or one above it'}; "
            f"effopt replaces its output folder as a whole, so choose a subfolder such as ./out, or {FORCE_HINT}"
        )
    ancestor = _existing_ancestor(target)
    if ancestor == target and not target.is_dir():
        raise EmitError(
            f"output folder {shown}: is a file, not a folder; effopt writes a folder of artefacts and never "
            "replaces a file (not even with --force): choose another path"
        )
    if not ancestor.is_dir():
        raise EmitError(f"output folder {shown}: cannot create it: {ancestor} is a file, not a folder")
    if ancestor == target or ancestor == target.parent:
        recover(target)
    if not target.exists():
        _require_writable(ancestor, f"output folder {shown}: cannot create it")
        return OutputCheck(target, "replace")
    entries = sorted(os.listdir(target))
    owned = effopt_files(target)
    foreign = [e for e in entries if not (owned is not None and _is_ours(e, owned))]
    if not foreign and not inside:
        _require_writable(target.parent, f"output folder {shown}: cannot replace it")
        return OutputCheck(target, "replace", owned or ())
    if not force:
        sample = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise EmitError(
            f"output folder {shown}: it holds files effopt did not write ({sample}); effopt replaces its output "
            f"folder as a whole, so it will not write there. Choose a new or empty folder, or {FORCE_HINT}"
        )
    blocked = [n for n in (*ARTEFACT_NAMES, MARKER) if (target / n).is_dir() or (target / n).is_symlink()]
    if blocked:
        raise EmitError(
            f"output folder {shown}: {blocked[0]} there is a folder or a link, and --force never replaces those; "
            "move it away or choose another output folder"
        )
    _require_writable(target, f"output folder {shown}: cannot write into it")
    return OutputCheck(target, "merge", owned or ())


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder; on success its files become ``target`` (see the module rules), on error it goes.

    ``with atomic_dir(out) as tmp: (tmp / "report.json").write_text(...)`` leaves either
    the previous ``out`` untouched or the new one complete, with its ``.effopt-output``.
    """
    check = check_output_dir(target, force)
    try:
        check.target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{check.target.name}.tmp-{os.getpid()}-", dir=check.target.parent))
    except OSError as e:
        raise EmitError(f"output folder {target}: cannot create it: {e.strerror or e}") from e
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the artefact folder should look like any other
    try:
        yield tmp
        write_marker(tmp)
        check = check_output_dir(target, force)  # the folder may have changed during a long compile
        _commit(check, tmp, str(target))
    except BaseException:
        with sigint_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_marker(folder: Path) -> Path:
    """Write ``.effopt-output`` listing every other file in ``folder``, sorted: the same bytes for the same files."""
    names = sorted(n for n in os.listdir(folder) if n != MARKER)
    path = folder / MARKER
    path.write_text(f"{MARKER_HEADER}\n{MARKER_COMMENT}" + "".join(f"{n}\n" for n in names))
    return path


def effopt_files(folder: Path) -> tuple[str, ...] | None:
    """The files effopt wrote in ``folder`` (its marker's list), or None when effopt did not write the folder.

    A folder without a marker written by an earlier effopt (only `ARTEFACT_NAMES`, and a
    ``report.json`` with effopt's ``report_version`` and ``status``) counts as effopt's too.
    """
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            lines = marker.read_text(errors="replace").splitlines()
        except OSError:
            return None
        if lines and lines[0].startswith("effopt output folder"):
            return tuple(line for line in lines[1:] if line and not line.startswith("#"))
        return None
    try:
        entries = os.listdir(folder)
    except OSError:
        return None
    if "report.json" not in entries or not set(entries) <= set(ARTEFACT_NAMES):
        return None
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and "report_version" in report and "status" in report:
        return tuple(sorted(entries))
    return None


def require_effopt_output(folder: Path, command: str) -> None:
    """Refuse (exit 2) to change reports in ``folder`` unless effopt compile wrote it (``effopt bench``)."""
    if not folder.is_dir() or effopt_files(folder) is not None:
        return
    present = [n for n in ("report.json", "report.md") if (folder / n).exists()]
    if present:
        raise EmitError(
            f"{folder}: {' and '.join(present)} there {'was' if len(present) == 1 else 'were'} not written by effopt "
            f"compile (no {MARKER}); {command} adds its results only to effopt's own reports. Give the folder "
            "effopt compile wrote"
        )


def check_output_file(path: str | Path, signature: str, flag: str = "-o") -> Path:
    """Check before any work that effopt may write the file ``path``; return it.

    An existing file is replaced only when its first line contains ``signature``
    (effopt wrote it); a folder, a user's file, or a parent that cannot be created
    is an `EmitError` (exit 2). Example: ``check_output_file("host.yaml",
    "written by effopt profile-host")`` passes for a missing host.yaml.
    """
    file = Path(path)
    if file.name in ("", ".", ".."):
        raise EmitError(f"{flag} {path}: expected a file name, such as host.yaml")
    if file.is_dir():
        raise EmitError(f"{flag} {path}: is a folder; give a file name inside it, such as {file / 'host.yaml'}")
    if file.exists():
        try:
            with file.open(errors="replace") as f:
                first = f.readline()
        except OSError as e:
            raise EmitError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
        if signature not in first:
            raise EmitError(
                f"{flag} {path}: the file exists and effopt did not write it; effopt will not overwrite it. "
                "Choose another file name, or remove it yourself"
            )
    ancestor = _existing_ancestor(Path(os.path.abspath(file)).parent)
    if not ancestor.is_dir():
        raise EmitError(f"{flag} {path}: cannot create it: {ancestor} is a file, not a folder")
    _require_writable(ancestor, f"{flag} {path}: cannot write it")
    return file


def write_file_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a unique temp file beside it and one rename; no temp file survives an error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    except OSError as e:
        raise EmitError(f"{path}: cannot write it: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with sigint_deferred():
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise EmitError(f"{path}: cannot write it: {e.strerror or e}") from e
        raise
    return path


def recover(target: Path) -> None:
    """Repair what a killed run left beside ``target``: restore a lone ``.old`` folder, remove stale ones.

    With ``out/`` missing and ``.out.old-123-ab12cd34`` from a dead process 123 (killed
    between the two renames), the old folder is renamed back to ``out``; stale
    ``.out.tmp-*`` folders are removed. Folders of a live process are left alone.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(.+)")
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for name in sorted(os.listdir(parent)):
        match = pattern.fullmatch(name)
        path = parent / name
        if match is None or path.is_symlink() or not path.is_dir() or _owner_alive(match.group(2)):
            continue
        stale[match.group(1)].append(path)
    with sigint_deferred():
        if not os.path.lexists(target) and stale["old"]:
            newest = max(stale["old"], key=lambda p: p.stat().st_mtime)
            _rename(newest, target)
            stale["old"].remove(newest)
    for path in stale["tmp"]:
        shutil.rmtree(path, ignore_errors=True)
    for path in stale["old"]:
        if not os.listdir(path) or effopt_files(path) is not None:  # never remove a folder holding user files
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C off until the block ends, so two renames are never split; then raise it.

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python cannot be restored: leave it in charge
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(signal.SIGINT, None)
            else:
                raise KeyboardInterrupt


def _commit(check: OutputCheck, tmp: Path, shown: str) -> None:
    target = check.target
    if check.mode == "merge":
        _merge(check, tmp, shown)
        return
    suffix = tmp.name[len(f".{target.name}.tmp-"):]
    old = target.with_name(f".{target.name}.old-{suffix}")
    moved = False
    with sigint_deferred():
        try:
            if os.path.lexists(target):
                os.replace(target, old)
                moved = True
            os.replace(tmp, target)
        except OSError as e:
            if moved and not os.path.lexists(target):
                os.replace(old, target)
            raise EmitError(f"output folder {shown}: cannot replace it: {e.strerror or e}") from e
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def _merge(check: OutputCheck, tmp: Path, shown: str) -> None:
    """``--force``: move effopt's files in one by one (the marker last), drop files only an earlier run wrote."""
    target = check.target
    written = sorted(n for n in os.listdir(tmp) if n != MARKER)
    try:
        for name in [*written, MARKER]:
            os.replace(tmp / name, target / name)
        for name in check.previous:
            old = target / name
            if name not in written and name != MARKER and "/" not in name and old.is_file() and not old.is_symlink():
                old.unlink()
    except OSError as e:
        raise EmitError(f"output folder {shown}: cannot write into it: {e.strerror or e}") from e
    shutil.rmtree(tmp, ignore_errors=True)


def _is_ours(name: str, owned: Sequence[str]) -> bool:
    """The marker, a listed file, or a listed file's temp copy (``.report.json.tmp`` from a killed bench)."""
    if name == MARKER or name in owned:
        return True
    return any(name == f".{o}.tmp" or name.startswith(f".{o}.tmp-") for o in owned)


def _owner_alive(suffix: str) -> bool:
    """Whether the process named in a ``<pid>-<rand>`` suffix still runs; names without a pid are stale."""
    match = re.match(r"(\d+)-", suffix)
    if match is None or int(match.group(1)) <= 0:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _require_writable(folder: Path, problem: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EmitError(f"{problem}: no permission to write in {folder}")


def _rename(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise EmitError(f"cannot restore {dst} from {src.name}: {e.strerror or e}; rename it back yourself") from e
