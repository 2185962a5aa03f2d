"""Save and load the torch int8 artefact (``model_int8.pt``): a TorchScript archive of the lowered module.

`effopt.optimizer.lower.torch_int8.lower_to_torch_int8` rebuilds a quantized graph from torch's
x86 int8 kernels; this module writes it so that ``torch.jit.load`` runs it without effopt or the
user's code.

Why TorchScript (torch 2.13): ``torch.export`` fails on the packed-weight script objects
(``Conv2dPackedParamsBase ... does not have a field with name '__obj_flatten__'``), so the
artefact is ``torch.jit.script`` of the lowered GraphModule (``torch.jit.trace`` where the script
compiler rejects a float op copied from the user's code), saved with ``torch.jit.save``. Loading
needs only ``torch``; the packed weights are stored unpacked and repacked by the loading
process's quantized engine (``x86`` by default on x86 CPUs).

Bytes: the zip entries carry a fixed 1980 timestamp and the serialization id derives from the
contents, so a fresh process saving the same model writes identical bytes (checked across
processes). Within one process the archive also records history: its debug info names fx's
generated-code key (``<eval_with_key>.N``, a process-wide counter), and TorchScript renames a
class it compiled before with other constants (``___torch_mangle_N``). Naming the lowered class
after a digest of its code and weights and keeping submodules flat (both in the lowering) removes
the common renames, not all: do not promise a sha256 of model_int8.pt (as for model.pt2).

Example::

    saved = save_torchscript(lowered, out / "model_int8.pt", ir.example_inputs)   # saved.method == 'script'
    load_torchscript(saved.path)(x)                                                # float logits
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from effopt.errors import EmitError
from effopt.optimizer.lower.torch_int8 import quiet_torch_warnings

__all__ = ["SavedTorchScript", "load_torchscript", "save_torchscript"]


@dataclass(frozen=True)
class SavedTorchScript:
    """Where `save_torchscript` wrote the archive and how: ``"script"`` or, where TorchScript's
    compiler rejects a float op copied from the user's model, ``"trace"`` (checked at two batch sizes)."""

    path: Path
    method: str


def save_torchscript(module: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor]) -> SavedTorchScript:
    """Write the lowered module as a TorchScript archive (``model_int8.pt``) that needs only torch to run.

    ``torch.jit.script`` keeps every shape free; it rejects some Python-isms fx copies from the
    user's float ops (e.g. ``F.interpolate(x, scale_factor=2)``: an int where it wants a float),
    and then the module is traced instead. The lowered graph is straight-line fx code, so a
    trace records the same ops; sizes read with ``x.size(0)`` stay dynamic. Either way the
    saved module must reproduce ``module`` exactly on ``example_inputs`` and on a batch twice
    as large, else `EmitError`. Example::

        save_torchscript(lowered, out / "model_int8.pt", ir.example_inputs).method   # 'script'
    """
    path = Path(path)
    inputs = tuple(example_inputs)
    doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
    errors: list[str] = []
    with quiet_torch_warnings(), torch.no_grad():
        for method in ("script", "trace"):
            try:
                compiled = torch.jit.script(module) if method == "script" else torch.jit.trace(module, inputs)
                for label, xs in (("the example inputs", inputs), ("a batch twice as large", doubled)):
                    if not _same_outputs(module(*xs), compiled(*xs)):
                        raise EmitError(f"the {method} differs from the int8 module on {label}")
                torch.jit.save(compiled, str(path))
                return SavedTorchScript(path, method)
            except Exception as e:  # TorchScript raises many unrelated types; try the next method
                text = str(e).strip()
                errors.append(f"{method}: {type(e).__name__}: {text.splitlines()[0] if text else ''}")
    raise EmitError(f"{path.name}: TorchScript cannot save the int8 module ({'; '.join(errors)}); "
                    "use model.pt2 instead")


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of an archive `save_torchscript` wrote, without torch's deprecation warnings.

    The weights are repacked by this process's quantized engine (``torch.backends.quantized.engine``).
    """
    with quiet_torch_warnings():
        return torch.jit.load(str(path))


def _same_outputs(a: Any, b: Any) -> bool:
    xs = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    ys = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(xs) == len(ys) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(xs, ys))
