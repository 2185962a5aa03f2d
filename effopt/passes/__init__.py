"""The pass registry: one explicit tuple, read top to bottom.

A recipe's pass word maps to the class whose ``name`` it is; `effopt passes`
lists this tuple with each pass's summary and options.
"""

from __future__ import annotations

from effopt.errors import PassError
from effopt.passes.base import Pass
from effopt.passes.eliminate_dead_code import EliminateDeadCode
from effopt.passes.fold_batchnorm import FoldBatchNorm
from effopt.passes.prune_channels import PruneChannels
from effopt.passes.low_rank import LowRank
from effopt.passes.prune_unstructured import PruneUnstructured
from effopt.passes.half_precision import HalfPrecision
from effopt.passes.quantize import Quantize
from effopt.passes.separable_conv import SeparableConv

REGISTRY: tuple[type[Pass], ...] = (
    FoldBatchNorm,
    EliminateDeadCode,
    PruneChannels,
    PruneUnstructured,
    Quantize,
    HalfPrecision,
    SeparableConv,
    LowRank,
)


def pass_names() -> tuple[str, ...]:
    return tuple(p.name for p in REGISTRY)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; the error lists every valid name."""
    for p in REGISTRY:
        if p.name == name:
            return p
    raise PassError(f"unknown pass {name!r}; valid passes: {', '.join(pass_names())}")
