"""What every pass test needs: passes built through the recipe validator, and an annotated IR."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from effopt.hardware_profiles import load_profile
from effopt.hardware_profiles.host import host_int8_weight_bits
from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.quant.schemes import QScheme
from effopt.passes.base import Pass, PassContext
from effopt.passes.manager import PassRecord, run_passes
from effopt.optimizer.ir.trace import trace_module
from effopt.recipes import parse_recipe


def recipe_passes(*entries: object) -> tuple[Pass, ...]:
    """The passes a recipe with ``passes: [*entries]`` builds (validator path, as users take it)."""
    recipe = {
        "version": 1,
        "model": {"factory": "tests.models:mlp"},
        "inputs": [{"name": "x", "shape": [1, 64]}],
        "passes": list(entries),
    }
    return parse_recipe(recipe).passes


def build_ir(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> IR:
    """Trace (unless already a GraphModule) and annotate ``model`` the way the compiler does (seeded example input)."""
    specs = (InputSpec("x", tuple(shape)),)
    generator = torch.Generator().manual_seed(seed)
    examples = tuple(s.example(generator) for s in specs)
    gm = model if isinstance(model, fx.GraphModule) else trace_module(model)
    return annotate(IR(gm, specs, examples))


HOST_WEIGHT_BITS = host_int8_weight_bits()
"""Weight bits this machine's int8 kernels multiply exactly: 7 on x86 without VNNI (int16 pair sums saturate)."""

HOST_WEIGHT_SCHEME = QScheme(bits=HOST_WEIGHT_BITS, signed=True, symmetric=True, axis=0)


def host_kernel_context() -> PassContext:
    """A context whose profile keeps int8 weights in the range this machine's kernels run exactly.

    Tests that compare an int8 runtime (onnxruntime, fbgemm) on this machine with effopt's fake-quant
    model need it: on a CPU without VNNI, 8-bit weights saturate the kernels' int16 pair sums, which
    is the runtime's limit, not the lowering's bug.
    """
    profile = load_profile("x86-avx2").model_copy(update={"int8_weight_bits": HOST_WEIGHT_BITS})
    return PassContext(profile=profile)


def run_recipe_passes(ir: IR, *entries: object, ctx: PassContext | None = None) -> tuple[IR, PassRecord]:
    """Run recipe pass entries on ``ir`` (x86-avx2 by default) and return the IR and the last pass's record."""
    ir, records = run_passes(ir, recipe_passes(*entries), ctx or PassContext(profile=load_profile("x86-avx2")))
    return ir, records[-1]


def rel(y: torch.Tensor, y0: torch.Tensor) -> float:
    """‖y − y0‖ / ‖y0‖, e.g. 0.1 for y0 = [3, 4] and y = [3, 4.5]."""
    return float((y - y0).norm() / y0.norm())
