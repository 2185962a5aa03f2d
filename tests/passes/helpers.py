"""What every pass test needs: passes built through the recipe validator, and an annotated IR."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from effopt.optimizer.ir.analysis import annotate
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.passes.base import Pass
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
