"""The quantized-graph contract (effopt.optimizer.quant.contract): what the quantize pass builds, what lowerings read.

Two kinds of tests: a conformance check that runs the ``quantize`` pass over every model of the
test zoo (and three small nets for the kinds the zoo lacks) and checks each node of the result
against the contract's rules; and one test per behaviour that used to differ between the pass and
the lowerings (clamp fused everywhere; getitem / interpolate tied, a no-op quantizer in runtimes
with integer tensors).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from effopt.optimizer.frontend.data import DataSource
from effopt.optimizer.ir.analysis import canonical_op
from effopt.optimizer.ir.core import IR, InputSpec
from effopt.optimizer.ir.trace import trace_module
from effopt.optimizer.lower.integer import IntClamp, IntConv, IntRequantize, IntSlice, lower_to_integer
from effopt.optimizer.lower.integer import lowering as integer_lowering
from effopt.optimizer.lower.onnx_qdq import activation_fuses
from effopt.optimizer.lower.torch_int8 import Unsupported, int8_engine, lower_to_torch_int8
from effopt.optimizer.quant.contract import (
    FUSED_ACTIVATIONS,
    PASS_THROUGH_KINDS,
    QPARAMS_FOLLOW_INPUT,
    REQUANTIZED_KINDS,
    SPLIT_KINDS,
    TIED_QPARAMS_KINDS,
    WEIGHTED_KINDS,
    Bounds,
    Mismatch,
    Site,
    activation_after,
    activation_bounds,
    is_fake_quant,
    match_site,
    quantizer_node,
    role,
)
from effopt.optimizer.quant.schemes import ACTIVATION_SCHEME, FakeQuant, QuantConv, QuantLinear
from effopt.passes.base import PassContext
from effopt.passes.manager import run_passes
from tests.models import ZOO, make_input
from tests.passes.helpers import build_ir, host_kernel_context, recipe_passes

needs_int8_engine = pytest.mark.skipif(int8_engine() is None, reason="this torch build has no x86 int8 engine")


# --- models the zoo lacks ---------------------------------------------------------------------------


class ClampNet(nn.Module):
    """Every fused activation after a conv, an add and a linear::

        x ─ conv ─ clamp(0, 4) ─ conv ─ Hardtanh(−0.5, 2) ─ conv ─ clamp(min=0) ─ add(·, ·) ─ relu6 ─ mean ─ fc
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.ht = nn.Hardtanh(-0.5, 2.0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.c1(x), 0.0, 4.0)
        x = self.ht(self.c2(x))
        x = self.c3(x).clamp(min=0.0)
        y = F.relu6(x + x)
        return self.fc(y.mean((2, 3)))


class SplitNet(nn.Module):
    """A chunk whose pieces (getitem, tied) feed a conv and an add::

        x ─ conv ─ relu ─ chunk ─[0]─ conv ─ add ─ conv
                              └─[1]────────┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.c1(x)).chunk(2, dim=1)
        return self.c3(self.c2(a) + b)


class UpsampleNet(nn.Module):
    """A nearest interpolate (tied) between two convs, and a max pool (pass-through) before it::

        x ─ conv ─ relu ─ max_pool ─ interpolate(×2) ─ conv
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        return self.c2(F.interpolate(x, scale_factor=2.0, mode="nearest"))


EXTRA: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "clamp_net": (ClampNet, (2, 3, 8, 8)),
    "split_net": (SplitNet, (2, 3, 8, 8)),
    "upsample_net": (UpsampleNet, (2, 3, 8, 8)),
}
TRACEABLE_ZOO = [name for name in ZOO if name != "untraceable_net"]


def _quantized(model: nn.Module, shape: tuple[int, ...], host_kernels: bool = False) -> IR:
    """``model`` after fold_batchnorm + quantize (static, min/max), calibrated on seeded random data."""
    torch.manual_seed(0)
    ir = build_ir(model.eval(), shape)
    g = torch.Generator().manual_seed(0)
    source = DataSource("random", TensorDataset(torch.randn(64, *shape[1:], generator=g)), 16, False)
    ctx = replace(host_kernel_context() if host_kernels else PassContext(), calibration=source)
    ir, _ = run_passes(ir, recipe_passes("fold_batchnorm", "quantize"), ctx)
    return ir


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name in EXTRA:
        cls, shape = EXTRA[name]
        torch.manual_seed(0)
        return cls(), shape
    builder, shape = ZOO[name]
    return builder(), shape


# --- conformance -------------------------------------------------------------------------------------


def _is_quantized_layer(n: fx.Node, gm: fx.GraphModule) -> bool:
    mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
    return isinstance(mod, (QuantConv, QuantLinear)) and mod.compute_dtype == "int8"


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.op != "get_attr"]


def _tied_source(n: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    source = n.all_input_nodes[0] if n.all_input_nodes else None
    if source is not None and canonical_op(source, gm) in SPLIT_KINDS:
        source = source.all_input_nodes[0] if source.all_input_nodes else None
    return source


def contract_violations(gm: fx.GraphModule) -> list[str]:
    """Every place where ``gm`` breaks the contract, as ``"node: what"``; empty when it conforms."""
    bad: list[str] = []
    integer_ops: set[fx.Node] = set()  # ops the pass made integer (their sites end in a FakeQuant)
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method") or is_fake_quant(n, gm):
            continue
        kind = canonical_op(n, gm)
        r = role(kind)
        inputs = _tensor_inputs(n)
        all_quantized = bool(inputs) and all(quantizer_node(a, gm) is not None for a in inputs)
        if r == "weighted" and _is_quantized_layer(n, gm) or r == "requantized" and all_quantized:
            integer_ops.add(n)
            if not all_quantized:  # rules 2-3: integer ops read quantized values
                bad.append(f"{n.name}: a {kind} reads a value without a FakeQuant")
            site = match_site(n, gm)
            if isinstance(site, Mismatch):
                bad.append(f"{n.name}: {site}")
            elif site.activation is not None and quantizer_node(site.activation, gm) is not None:
                bad.append(f"{n.name}: its fused activation has a quantizer of its own")
        elif r == "pass_through" and inputs and quantizer_node(inputs[0], gm) is not None:
            if quantizer_node(n, gm) is not quantizer_node(inputs[0], gm):  # rule 4: the input's grid
                bad.append(f"{n.name}: a pass-through {kind} is not on its input's grid")
            if any(is_fake_quant(u, gm) for u in n.users):
                bad.append(f"{n.name}: a pass-through {kind} has a FakeQuant of its own")
        elif r == "tied":
            source = _tied_source(n, gm)
            own = quantizer_node(source, gm) if source is not None else None
            if own is None:
                continue  # a float value (or a size): nothing to tie
            users = list(n.users)
            if len(users) != 1 or not is_fake_quant(users[0], gm):
                bad.append(f"{n.name}: a tied {kind} is not followed by exactly one FakeQuant")
                continue
            mine, theirs = gm.get_submodule(str(users[0].target)), gm.get_submodule(str(own.target))
            if not (torch.equal(mine.scale, theirs.scale) and torch.equal(mine.zero_point, theirs.zero_point)):
                bad.append(f"{n.name}: the FakeQuant after a tied {kind} does not carry its input's qparams")
    for q in (n for n in gm.graph.nodes if is_fake_quant(n, gm)):
        fq = gm.get_submodule(str(q.target))
        source = q.args[0]
        if fq.scheme.axis is not None or not fq.calibrated:
            bad.append(f"{q.name}: an activation FakeQuant must be calibrated and per tensor (rule 1)")
        if not isinstance(source, fx.Node) or source.op == "placeholder":
            continue
        if is_fake_quant(source, gm):
            bad.append(f"{q.name}: quantizes a value that is already a FakeQuant output")
            continue
        op = source.all_input_nodes[0] if source.all_input_nodes and canonical_op(source, gm) in FUSED_ACTIVATIONS \
            and activation_after(source.all_input_nodes[0], gm) is source else source
        if op in integer_ops or role(canonical_op(source, gm)) == "tied":
            continue  # the end of a site (rules 2-3), or a tied quantizer (rule 5)
        # rule 6: float-only ops are not quantized; a FakeQuant after one is there because an integer op reads it
        if role(canonical_op(source, gm)) == "pass_through" and quantizer_node(source, gm) is not None:
            bad.append(f"{q.name}: requantizes a pass-through of a quantized value (rule 4)")
        elif not any(u in integer_ops for u in q.users):
            bad.append(f"{q.name}: quantizes the float value of '{source.name}' but no integer op reads it (rule 6)")
    return bad


@pytest.mark.parametrize("name", [*TRACEABLE_ZOO, *EXTRA])
def test_the_quantize_pass_builds_the_contract(name: str) -> None:
    model, shape = _model(name)
    ir = _quantized(model, shape)
    quants = [n for n in ir.gm.graph.nodes if is_fake_quant(n, ir.gm)]
    assert quants, "precondition: the pass quantized something"
    assert contract_violations(ir.gm) == []


def test_the_conformance_check_catches_a_broken_graph() -> None:
    """The check is not vacuous: a pass-through given its own quantizer, and a site broken by a second reader."""
    ir = _quantized(UpsampleNet(), EXTRA["upsample_net"][1])
    gm = ir.gm
    pool = next(n for n in gm.graph.nodes if canonical_op(n, gm) == "max_pool")
    gm.add_submodule("extra_q", FakeQuant(ACTIVATION_SCHEME).set_qparams(torch.tensor(0.1), torch.tensor(0)))
    with gm.graph.inserting_after(pool):
        extra = gm.graph.call_module("extra_q", (pool,))
    for u in [u for u in pool.users if u is not extra]:
        u.replace_input_with(pool, extra)
    conv = next(n for n in gm.graph.nodes if canonical_op(n, gm) == "conv")
    with gm.graph.inserting_after(conv):
        gm.graph.call_function(torch.sigmoid, (conv,))
    found = contract_violations(gm)
    assert any("pass-through max_pool has a FakeQuant of its own" in v for v in found), found
    assert any(f"node '{conv.name}' (conv) result reaches" in v for v in found), found


def test_the_kinds_partition_and_every_pass_through_kind_lowers_to_integers() -> None:
    tables = [WEIGHTED_KINDS, REQUANTIZED_KINDS, FUSED_ACTIVATIONS, PASS_THROUGH_KINDS, SPLIT_KINDS, TIED_QPARAMS_KINDS]
    for i, a in enumerate(tables):
        for b in tables[i + 1 :]:
            assert not (a & b), a & b
    assert QPARAMS_FOLLOW_INPUT == PASS_THROUGH_KINDS | TIED_QPARAMS_KINDS
    lowered = integer_lowering._RESHAPES | integer_lowering._ALIASES | integer_lowering._TRANSPOSES | \
        integer_lowering._MAX_POOLS
    assert lowered == PASS_THROUGH_KINDS
    assert role("gelu") == "float" and role("getitem") == "tied" and role("clamp") == "fused_activation"


@pytest.mark.parametrize(
    ("call", "bounds"),
    [
        (lambda x: F.relu(x), Bounds(0.0, math.inf)),
        (lambda x: F.relu6(x), Bounds(0.0, 6.0)),
        (lambda x: F.hardtanh(x), Bounds(-1.0, 1.0)),
        (lambda x: F.hardtanh(x, -0.5, 2.0), Bounds(-0.5, 2.0)),
        (lambda x: torch.clamp(x, 0.0, 4.0), Bounds(0.0, 4.0)),
        (lambda x: x.clamp(min=0.0), Bounds(0.0, math.inf)),
        (lambda x: torch.clamp_max(x, 6.0), Bounds(-math.inf, 6.0)),
    ],
)
def test_activation_bounds_follow_torch_defaults(call: object, bounds: Bounds) -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return call(x)  # type: ignore[operator]

    gm = trace_module(Net())
    act = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    assert activation_bounds(act, gm) == bounds


def test_a_computed_bound_breaks_the_site() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(self.conv(x), max=x.amax())

    gm = trace_module(Net())
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    result = match_site(conv, gm)
    assert isinstance(result, Mismatch) and "bounds that are not constants" in result.what


# --- the settled behaviours ---------------------------------------------------------------------------


def _site_of(ir: IR, op_name: str) -> Site:
    site = match_site(next(n for n in ir.gm.graph.nodes if n.name == op_name), ir.gm)
    assert isinstance(site, Site), site
    return site


@needs_int8_engine
def test_clamp_is_a_fused_activation_in_every_lowering() -> None:
    """conv → clamp(0, 4) → FQ: one quantizer for both (the pass); onnxruntime drops the Clip inside
    [0, 4]; torch int8 clamps the conv's int8 result; the integer program folds [0, 4] into its clamp."""
    ir = _quantized(ClampNet(), EXTRA["clamp_net"][1], host_kernels=True)
    site = _site_of(ir, "c1")
    assert site.activation is not None and site.activation.name == "clamp" and site.bounds == Bounds(0.0, 4.0)
    fq = site.fake_quant
    assert activation_fuses(0.0, 4.0, fq.frozen_scale, fq.frozen_zero, fq.scheme)  # min/max calibration: inside
    assert _site_of(ir, "c3").bounds == Bounds(0.0, math.inf)  # clamp(min=0) is a relu

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered  # before: "result reaches 'clamp' without a FakeQuant"
    code = lowered.code
    assert "hardtanh(c1, 0.0, 4.0)" in code and ".dequantize()" not in code.split("c2 = ")[0]

    program = lower_to_integer(ir.gm, ir.example_inputs)
    conv = next(op for op in program.ops if isinstance(op, IntConv) and op.name == "c1")
    qp = program.tensor(conv.output).qparams
    assert (conv.act_min, conv.act_max) == (max(qp.qmin, qp.code_of(0.0)), min(qp.qmax, qp.code_of(4.0)))
    assert not any(isinstance(op, IntClamp) for op in program.ops)  # every activation fused into its op


@needs_int8_engine
def test_getitem_of_a_split_is_tied_and_a_no_op_quantizer_on_integer_tensors() -> None:
    """chunk → getitem → FQ(tied): the FakeQuant carries exactly the chunk input's qparams, which onnxruntime
    needs (no Q/DQ moves through Split) and torch int8 / the integer program run as no-ops."""
    ir = _quantized(SplitNet(), EXTRA["split_net"][1], host_kernels=True)
    gm = ir.gm
    pieces = [n for n in gm.graph.nodes if canonical_op(n, gm) == "getitem"]
    assert len(pieces) == 2
    source = quantizer_node(pieces[0].all_input_nodes[0].all_input_nodes[0], gm)
    assert source is not None
    for piece in pieces:
        (q,) = piece.users
        mine, theirs = gm.get_submodule(str(q.target)), gm.get_submodule(str(source.target))
        assert torch.equal(mine.scale, theirs.scale) and torch.equal(mine.zero_point, theirs.zero_point)

    lowered = lower_to_torch_int8(gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered
    assert lowered.code.count("torch.quantize_per_tensor(") == 1  # the model input only: tied quantizers vanish

    program = lower_to_integer(gm, ir.example_inputs)
    assert sum(isinstance(op, IntSlice) for op in program.ops) == 2
    assert not any(isinstance(op, IntRequantize) for op in program.ops)


@needs_int8_engine
def test_interpolate_is_tied_and_runs_on_the_codes_in_torch_int8() -> None:
    ir = _quantized(UpsampleNet(), EXTRA["upsample_net"][1], host_kernels=True)
    gm = ir.gm
    up = next(n for n in gm.graph.nodes if canonical_op(n, gm) == "interpolate")
    pool = up.all_input_nodes[0]
    assert role(canonical_op(pool, gm)) == "pass_through" and not any(is_fake_quant(u, gm) for u in pool.users)
    (q,) = up.users
    tied, source = gm.get_submodule(str(q.target)), gm.get_submodule(str(quantizer_node(pool, gm).target))
    assert (tied.frozen_scale, tied.frozen_zero) == (source.frozen_scale, source.frozen_zero)

    lowered = lower_to_torch_int8(gm, ir.example_inputs)
    assert not isinstance(lowered, Unsupported), lowered
    code = lowered.code
    assert "interpolate" in code and code.count("torch.quantize_per_tensor(") == 1 and code.count(".dequantize()") == 1
    with torch.no_grad():
        x = make_input(EXTRA["upsample_net"][1], seed=1)
        out = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes[0]
        step = gm.get_submodule(str(out.target)).frozen_scale
        assert float((lowered(x) - gm.eval()(x)).abs().max()) <= 2 * step + 1e-6
