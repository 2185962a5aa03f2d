"""Read the user's tensor files (weights, data) safely, and say what a file is when it is not what we need.

torch and NumPy fail on a wrong file with messages about their internals
(``pop from empty list`` for a text file given to ``torch.load``; "contains
pickled (object) data" for a text file given to ``np.load``). effopt looks at
the first bytes first and names what the file actually is:

    >>> describe_file(Path("notes.pt"))        # a file holding "hello world\\n"
    "a text file (starts 'hello world')"

Nothing here runs code from a file: ``torch.load`` always gets
``weights_only=True`` and ``np.load`` keeps ``allow_pickle=False``. A file that
needs code to load is refused, and the message says so and why that is right.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from effopt.errors import EffoptError
from effopt.optimizer.ir.trace import raise_if_interrupted

FileKind = Literal["empty", "torch-zip", "npz", "zip", "pickle", "npy", "hdf5", "text", "binary"]

_PICKLE_PROTOCOLS = {bytes([0x80, v]) for v in range(2, 6)}


def file_kind(path: Path) -> FileKind:
    """What the bytes of ``path`` look like: a `torch.save` zip, an ``.npz``, a pickle, text, ...

    >>> file_kind(Path("weights.pt"))   # written by torch.save(model.state_dict(), ...)
    'torch-zip'
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "zip"
    if head[:2] in _PICKLE_PROTOCOLS:
        return "pickle"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89HDF"):
        return "hdf5"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    return "text" if all(c.isprintable() or c in "\t\r\n" for c in text) else "binary"


_DESCRIPTIONS: dict[str, str] = {
    "empty": "an empty file",
    "torch-zip": "a torch.save file",
    "npz": "a NumPy .npz archive (np.savez)",
    "zip": "a zip archive that is neither a torch.save file nor a NumPy .npz",
    "pickle": "a Python pickle (torch.save's legacy format, or pickle.dump)",
    "npy": "a single NumPy array (np.save, .npy); save it with np.savez(path, x=array) for a .npz",
    "hdf5": "an HDF5 file (Keras/h5py), which effopt does not read",
    "binary": "binary data in no format effopt reads",
}


def describe_file(path: Path) -> str:
    """``file_kind`` in words, quoting the start of a text file."""
    kind = file_kind(path)
    if kind == "text":
        with open(path, "rb") as f:
            start = f.read(40).decode("utf-8", errors="replace").splitlines()[0].strip()
        return f"a text file (starts {start!r})"
    return _DESCRIPTIONS[kind]


def refused_global(error: BaseException) -> str | None:
    """The class or function a ``weights_only`` load refused, e.g. ``torch.nn.modules.linear.Linear``."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def _short(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def load_torch_file(path: Path, where: str, fix: str, error: type[EffoptError]) -> object:
    """``torch.load(path, weights_only=True)``, or ``error`` naming what the file is and ``fix``.

    ``where`` starts every message (``digits.yaml: model.weights``); ``fix`` says how
    to save the file so effopt can read it; ``error`` is the caller's type
    (`RecipeError` for weights, `DataError` for data).
    """
    kind = file_kind(path)
    if kind not in ("torch-zip", "pickle"):
        rename = "; it is an .npz: give it the .npz suffix" if kind == "npz" else ""
        raise error(f"{where}: {path.name} is not a torch.save file: it is {describe_file(path)}{rename}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt
        refused = refused_global(e)
        if refused is not None or "Weights only load failed" in str(e):
            what = f"it pickles {refused}" if refused else "it pickles Python objects"
            raise error(
                f"{where}: {path.name} was refused by torch.load(weights_only=True): {what}, and loading it would run "
                f"that code. effopt never runs code from a data or weights file (which is right: a .pt from "
                f"elsewhere can do anything when unpickled). {fix}"
            ) from e
        raise error(f"{where}: {path.name} looks like {describe_file(path)} but torch.load cannot read it "
                          f"({_short(e)}); is it truncated? {fix}") from e


def load_npz(path: Path, where: str, fix: str, error: type[EffoptError]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (no pickled objects), or ``error`` naming what the file is and ``fix``."""
    kind = file_kind(path)
    if kind != "npz":
        rename = "; it is a torch.save file: give it the .pt suffix" if kind == "torch-zip" else ""
        raise error(f"{where}: {path.name} is not a NumPy .npz archive: it is {describe_file(path)}{rename}. {fix}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as e:  # an object array: it would have to be unpickled
                    raise error(
                        f"{where}: {path.name}: array '{key}' holds Python objects (dtype=object), which would have "
                        f"to be unpickled, and effopt never runs code from a data file. {fix}"
                    ) from e
    except EffoptError:
        raise
    except Exception as e:  # a damaged archive: BadZipFile, OSError, ValueError, ...
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt
        raise error(f"{where}: {path.name} is a zip of .npy files but NumPy cannot read it ({_short(e)}); "
                          f"is it truncated? {fix}") from e
    return arrays
