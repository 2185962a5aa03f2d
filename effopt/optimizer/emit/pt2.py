"""The ``model.pt2`` artefact: torch.export of the optimized model with a dynamic batch, saved and hashed.

The program must load with ``torch.export.load`` where only torch is imported, so a quantized
model is exported in `aten_export_form`: its quantize/dequantize steps are core aten ops
(``round``, ``clamp``, ``mul``, ...) with the same results, not ``torch.ops.quantized_decomposed``
ops, which exist only once ``torch.ao.quantization.fx._decomposed`` has been imported.

Where artefacts go, and how a folder is replaced atomically, is `effopt.optimizer.emit.writer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from effopt.errors import EmitError
from effopt.optimizer.ir.core import InputSpec
from effopt.optimizer.ir.trace import raise_if_interrupted
from effopt.optimizer.quant.schemes import aten_export_form

MAX_DYNAMIC_BATCH = 4096


def export_args(
    specs: Sequence[InputSpec], example_inputs: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, object] | None, ...] | None]:
    """Example args and ``dynamic_shapes`` for torch.export with a shared dynamic batch.

    torch.export specialises a dimension of size 1 to the constant 1, so a
    dynamic batch is exported from examples of batch 2.
    """
    if not any(s.dynamic_batch for s in specs):
        return tuple(example_inputs), None
    batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    args = []
    for s, x in zip(specs, example_inputs):
        if s.dynamic_batch and x.shape[0] == 1:
            x = x.expand(2, *x.shape[1:]).contiguous()
        args.append(x)
    return tuple(args), tuple({0: batch} if s.dynamic_batch else None for s in specs)


def export_program(module: nn.Module, specs: Sequence[InputSpec], example_inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export the optimized model with a dynamic batch where the recipe asks for one.

    Quantizers are exported in `aten_export_form` (core aten ops only), so the saved program
    needs nothing but torch to load: ``torch.export.load("model.pt2").module()(x)``.
    """
    from effopt.optimizer.emit.quiet import quiet_third_party  # torch.export prints partial graphs on failure

    args, dynamic = export_args(specs, example_inputs)
    try:
        with quiet_third_party(), aten_export_form(module):
            return torch.export.export(module, args, dynamic_shapes=dynamic)
    except Exception as e:
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        hint = (
            "the inputs' dynamic_batch: false may help" if "specializ" in text or "Constraints violated" in text
            else "replace data-dependent Python control flow in forward() with torch.where/torch.cond"
        )
        raise EmitError(
            f"torch.export failed on the optimized {type(module).__name__}: {first}. Fix: {hint}; "
            "or leave 'pt2' out of output.formats to skip this artefact"
        ) from e


def save_pt2(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Save ``program``; quietly, since torch warns "No complete tensor found" for channels-last weights
    (a bf16 model for a CPU target), which it stores and reloads with their strides all the same."""
    from effopt.optimizer.emit.quiet import quiet_third_party

    with quiet_third_party():
        torch.export.save(program, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
