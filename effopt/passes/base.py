"""The small interface every pass implements, and what a pass returns.

A pass is a class with a ``name`` (== its module name == the recipe word), a
frozen pydantic ``Options`` model, the passes it must run ``after`` when both
are present, and one method, ``run(ir, ctx) -> PassResult``. It never touches
files, the CLI or global state: everything it needs from outside (the target
profile, data, randomness) arrives in `PassContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from effopt.optimizer.ir.core import IR, CostDelta


class PassOptions(BaseModel):
    """Base of every pass's options: frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Skip:
    """A site the pass looked at and left alone, with the reason shown verbatim in the report."""

    node: str
    reason: str


@dataclass(frozen=True)
class PassContext:
    """What a pass may know about the world: target, data, randomness.

    ``profile`` is a `HardwareProfile` (typed loosely here to keep the IR layer
    free of schema imports). ``seed`` feeds `generator()`; passes never touch
    the global RNG, so the same recipe replays byte for byte.
    """

    profile: Any = None
    seed: int = 0
    calibration: Any = None
    services: Mapping[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class PassResult:
    """What a pass did. ``delta`` is filled in by the pass manager, never by the pass."""

    ir: IR
    changed: tuple[str, ...] = ()
    skipped: tuple[Skip, ...] = ()
    stats: Mapping[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # things the user should know, shown in the report
    delta: CostDelta | None = None
    # one row per site the pass decided about (layer, channels before/after, error, ...): JSON-ready
    # values, same keys in every row; the report shows them as a table under the pass
    details: tuple[Mapping[str, Any], ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.changed)


class Pass(ABC):
    """Base class of effopt passes (see `effopt.passes` for the registry).

    ``lossy`` passes change what the model computes (pruning, quantization) and
    are chosen by ``passes: auto`` only when the goal allows an accuracy drop;
    exact passes (folding, dead-code removal) always may be.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[PassOptions]] = PassOptions
    after: ClassVar[tuple[str, ...]] = ()
    lossy: ClassVar[bool] = False

    def __init__(self, options: PassOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def target_support(self, profile: Any) -> str | None:
        """Why this pass cannot run for ``profile`` (e.g. int8 needs int8 support), or None if it can."""
        return None

    @abstractmethod
    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        """Rewrite ``ir`` and say what changed; leave sites it cannot handle untouched and list them as `Skip`s."""
