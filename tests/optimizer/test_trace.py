"""trace_module binds forward's flags and options to their defaults, so the graph takes exactly the declared inputs.

Why: ``forward(self, x, embed=False)`` with ``if embed:`` inside is how people write
models; the flag is not data, and fx can trace it once it is a constant. The tests
check the binding (which parameters), the graph (only the declared placeholders, no
guards left) and the numbers (the traced module equals the eager one at the defaults).
"""

from __future__ import annotations

import enum
import re
from typing import Optional

import pytest
import torch
import torch.fx as fx
from torch import nn

from effopt.errors import FxTraceError, TraceError
from effopt.optimizer.ir.trace import bound_defaults, trace_module


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


class Options(nn.Module):
    """Every kind of default people give forward: bool, Optional tensor, keyword-only float, tuple, str, enum, tensor.

    x ─ fc ─┬─ (embed) (y, y)
            └─ + offset if name == 'plus' ─ × 2 if mode is FAST ─ × mask ─ (sum(dims[0]) × scale, y)
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(
        self, x: torch.Tensor, embed: bool = False, mask: Optional[torch.Tensor] = None, dims: tuple[int, int] = (1, 0),
        name: str = "plus", mode: Mode = Mode.FAST, offset: torch.Tensor = torch.full((3,), 0.5), *, scale: float = 2.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        if embed:
            return y, y
        if name == "plus":
            y = y + offset
        if mode is Mode.FAST:
            y = y * 2
        if mask is not None:
            y = y * mask
        return y.sum(dims[0]) * scale, y


def _placeholders(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def test_bound_defaults_are_the_parameters_after_the_declared_inputs_that_have_defaults() -> None:
    bound = bound_defaults(Options(), 1)
    assert list(bound) == ["embed", "mask", "dims", "name", "mode", "offset", "scale"]
    assert bound["embed"] is False and bound["mask"] is None and bound["scale"] == 2.0
    assert "embed" not in bound_defaults(Options(), 2)  # two declared inputs: embed is data


def test_a_forward_with_star_args_binds_nothing() -> None:
    class StarArgs(nn.Module):
        def forward(self, x: torch.Tensor, *rest: torch.Tensor, flag: bool = False) -> torch.Tensor:
            return x

    assert bound_defaults(StarArgs(), 1) == {}


def test_without_binding_the_flag_fx_cannot_trace_it() -> None:
    # precondition: the model really is untraceable as written
    with pytest.raises(FxTraceError, match="control flow"):
        trace_module(Options())


def test_flags_optional_and_keyword_only_args_trace_to_the_declared_inputs_only() -> None:
    model = Options().eval()
    gm = trace_module(model, n_inputs=1)
    assert _placeholders(gm) == ["x"]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "assert" in str(n.target)]  # no guards left
    assert re.search(r"def forward\(self, x( : \w+)?\):", gm.code), gm.code  # one parameter, maybe annotated
    x = torch.randn(5, 4)
    for ours, theirs in zip(gm(x), model(x)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_traced_flag_model_keeps_its_module_structure() -> None:
    gm = trace_module(Options(), n_inputs=1)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc"]


def test_a_model_that_reads_an_input_it_does_not_declare_is_still_a_count_mismatch() -> None:
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # y has no default: it is data
            return x + y

    gm = trace_module(TwoInputs(), n_inputs=1)
    assert _placeholders(gm) == ["x", "y"]  # compiler.build_ir then names both in a RecipeError


def test_fx_failures_are_trace_errors_with_their_parts() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(TraceError) as e:
        trace_module(DataDependent(), n_inputs=1)
    error = e.value
    assert isinstance(error, FxTraceError)
    assert error.where == "the top-level module (DataDependent)" and "test_trace.py:" in (error.line or "")
    assert str(error) == f"{error.reason()}. Fix: {error.hint}"
    assert error.reason("here.py:1").endswith("at here.py:1: TraceError: symbolically traced variables cannot be "
                                               "used as inputs to control flow")
