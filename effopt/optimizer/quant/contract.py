"""The quantized-graph contract: what the ``quantize`` pass builds and every lowering may rely on.

The quantized model stays an fx graph of float ops; which tensors are integers is said by
`FakeQuant` modules on the edges. The pass (`effopt.passes.quantize`) writes that graph and the
lowerings (`effopt.optimizer.lower.onnx_qdq` via the ONNX export, `...lower.torch_int8`,
`...lower.integer`) read it, all through the kinds and helpers below, in effopt's canonical op
kinds (`effopt.optimizer.ir.analysis.canonical_op`):

1. Every tensor stored as integers is the output of a ``call_module`` node whose module is a
   `FakeQuant` (per tensor, ``scheme.axis is None``). Model inputs that feed quantized ops get
   one right after the placeholder.
2. ``WEIGHTED_KINDS``: a `QuantConv` / `QuantLinear` reads a quantized tensor (a FakeQuant
   output, possibly through pass-through ops, rule 4) and its result is requantized by exactly
   one FakeQuant, directly or after one fused activation (``FUSED_ACTIVATIONS``) whose only
   user is that FakeQuant: a *site*, ``op → [activation] → FakeQuant`` (`match_site`). The
   weight goes through the module's own per-channel ``weight_quant``; its float bias is
   quantized at s_x·s_w (`quantize_bias`) by lowerings that need integers.
3. ``REQUANTIZED_KINDS`` (add, mul, matmul, cat, avg / adaptive-avg pool, mean) read quantized
   inputs and end in a site too (an add may fuse a relu, as in rule 2).
4. ``PASS_THROUGH_KINDS`` (max pool, flatten, reshape/view, permute/transpose, dropout/identity,
   ...) keep their input's scale and zero point: their output carries no FakeQuant of its own.
   ``SPLIT_KINDS`` (split, chunk, unbind) return pieces of their input, picked by getitem.
5. ``TIED_QPARAMS_KINDS`` (getitem, of a split's pieces or of a tensor, and interpolate) keep
   their input's grid too, but carry a FakeQuant of their own whose scale and zero point are
   copied from the input's (*tied*).
6. Every other kind (`role` ``"float"``) computes in float on dequantized inputs; if its result
   feeds a quantized op, a FakeQuant sits between them (rule 1).
7. ``INTEGER_ACTIVATION_KINDS`` (prelu, softmax over the channel dim) are float ops under rule 6
   for every runtime with float kernels; for an int-only target the pass also quantizes their
   input and output, a site like rule 3, which the integer program runs with integer kernels
   (`effopt.optimizer.lower.integer.activations`). A softmax output's FakeQuant is fixed, not
   calibrated: scale 1/256 from the real value 0 (`softmax_output_qparams`), as TFLite's int8
   softmax writes it. `integer_activation_refusal` says why one cannot be made integer.

How each runtime reads the kinds that used to be disputed (measurements: docs/quantization.md):

- ``clamp`` is a fused activation like hardtanh: onnxruntime drops the Clip before a
  QuantizeLinear whose range lies inside its bounds; torch's int8 kernels clamp the int8 result
  (quantized ``hardtanh``/``clamp``, same values as clamping first); the integer program folds
  the bounds into ``[act_min, act_max]``.
- ``getitem`` / ``interpolate`` are tied: onnxruntime does not move Q/DQ through Split or
  Resize, so it needs the Q/DQ pair after them. torch's int8 kernels and the integer program run
  them on the codes, which keeps the input's grid, so the tied FakeQuant (equal parameters) is a
  no-op there: tied is pass-through plus a quantizer that changes nothing.

Worked example (``x ─FQ─ conv ─ relu ─FQ─ max_pool ─ flatten ─ linear ─FQ``): conv is weighted
and its site is ``conv → relu → FQ`` with bounds (0, ∞); max_pool and flatten are pass-through,
so `quantizer_node` of the flatten is the FQ after the relu, the grid the linear reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch.fx as fx

from effopt.optimizer.ir.analysis import CLAMP_ACTIVATIONS, canonical_op, clamp_after
from effopt.optimizer.quant.schemes import FakeQuant

__all__ = [
    "FUSED_ACTIVATIONS",
    "PASS_THROUGH_KINDS",
    "QPARAMS_FOLLOW_INPUT",
    "REQUANTIZED_KINDS",
    "INTEGER_ACTIVATION_KINDS",
    "SOFTMAX_OUTPUT_SCALE",
    "SPLIT_KINDS",
    "TIED_QPARAMS_KINDS",
    "WEIGHTED_KINDS",
    "Bounds",
    "Mismatch",
    "Role",
    "Site",
    "activation_after",
    "activation_bounds",
    "call_arg",
    "integer_activation_refusal",
    "is_fake_quant",
    "match_site",
    "quantizer_node",
    "role",
    "softmax_dim",
    "softmax_output_qparams",
]

WEIGHTED_KINDS: frozenset[str] = frozenset({"conv", "linear"})
"""Rule 2: rewritten to `QuantConv` / `QuantLinear` (int8 weights) and ended by a site."""

REQUANTIZED_KINDS: frozenset[str] = frozenset({"add", "mul", "matmul", "cat", "avg_pool", "adaptive_avg_pool", "mean"})
"""Rule 3: integer ops without weights; quantized inputs, ended by a site."""

FUSED_ACTIVATIONS: frozenset[str] = CLAMP_ACTIVATIONS
"""Activations a site may hold between its op and its FakeQuant (`activation_bounds` gives their range)."""

PASS_THROUGH_KINDS: frozenset[str] = frozenset({
    "max_pool", "adaptive_max_pool", "flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze",
    "permute", "transpose", "t", "contiguous", "dropout", "identity",
})
"""Rule 4: no FakeQuant of their own; the output is on the input's grid."""

SPLIT_KINDS: frozenset[str] = frozenset({"split", "chunk", "unbind"})
"""Rule 4: a tuple of pieces of the input; each piece is picked by a (tied) getitem."""

TIED_QPARAMS_KINDS: frozenset[str] = frozenset({"getitem", "interpolate"})
"""Rule 5: a FakeQuant of their own with the input's scale and zero point."""

QPARAMS_FOLLOW_INPUT: frozenset[str] = PASS_THROUGH_KINDS | TIED_QPARAMS_KINDS
"""Kinds whose output, computed on the input's codes, is on the input's grid (rules 4-5): what a
runtime with integer tensors (torch's quint8, the integer program) runs directly on the codes."""

INTEGER_ACTIVATION_KINDS: frozenset[str] = frozenset({"prelu", "softmax"})
"""Rule 7: float ops elsewhere, integer sites on int-only targets (see `integer_activation_refusal`)."""

SOFTMAX_OUTPUT_SCALE = 1.0 / 256.0
"""Rule 7: a softmax output's scale; probabilities [0, 1) in 256 steps (1.0 itself saturates to the top code)."""

Role = Literal["weighted", "requantized", "fused_activation", "pass_through", "split", "tied", "float"]

_ROLES: tuple[tuple[frozenset[str], Role], ...] = (
    (WEIGHTED_KINDS, "weighted"),
    (REQUANTIZED_KINDS, "requantized"),
    (FUSED_ACTIVATIONS, "fused_activation"),
    (PASS_THROUGH_KINDS, "pass_through"),
    (SPLIT_KINDS, "split"),
    (TIED_QPARAMS_KINDS, "tied"),
)


def role(kind: str) -> Role:
    """What the contract does with a canonical op kind: ``role("add") == "requantized"``, ``role("gelu") == "float"``.

    A fused activation is only fused inside a site; elsewhere (e.g. a relu after a max pool) the
    quantize pass leaves it in float (rule 6) and an integer runtime may clamp codes with it.
    """
    return next((r for kinds, r in _ROLES if kind in kinds), "float")


def is_fake_quant(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``n`` calls a `FakeQuant` module."""
    return n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), FakeQuant)


def quantizer_node(value: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The FakeQuant node whose grid ``value`` is on: itself, or the one before a chain of pass-through ops.

    None when ``value`` is not quantized (a float op, a placeholder, a tied op without its FakeQuant).
    E.g. for ``q ─ max_pool ─ flatten`` the flatten's quantizer is ``q``.
    """
    node: fx.Node | None = value
    while node is not None and not is_fake_quant(node, gm):
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        if canonical_op(node, gm) not in PASS_THROUGH_KINDS or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]
    return node


def call_arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    """Argument ``name`` of a call_function/call_method node, given by keyword or at position ``pos``.

    Position 0 is the input (``self`` of a method), so for ``F.hardtanh(x, 0.0, 6.0)``
    ``call_arg(n, 2, "max_val", 1.0)`` is 6.0, and 1.0 for ``F.hardtanh(x)``. A name cannot be
    given both ways (Python rejects the call), so the order of the checks does not matter.
    """
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[pos] if len(n.args) > pos else default


# -- sites: op → [activation] → FakeQuant -----------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The range a fused activation clamps to; an open side is ±inf. relu is (0, inf), relu6 (0, 6)."""

    lo: float
    hi: float

    @property
    def is_relu(self) -> bool:
        """(0, inf): what the fused conv+relu / add_relu kernels compute."""
        return self.lo == 0.0 and math.isinf(self.hi) and self.hi > 0


@dataclass(frozen=True)
class Mismatch:
    """Why ``node`` breaks the contract; ``what`` finishes the sentence ``node 'name' (kind) ...``.

    Lowerings record it as one of their problems, so both word it the same way, e.g.
    ``node 'conv' (conv) result reaches 'max_pool2d' without a FakeQuant: ...``.
    """

    node: fx.Node
    kind: str
    what: str

    def __str__(self) -> str:
        return f"node '{self.node.name}' ({self.kind}) {self.what}"


@dataclass(frozen=True)
class Site:
    """An integer op and where its result is requantized: ``op → [activation] → quant``.

    ``bounds`` is the activation's range (None without an activation); ``fake_quant`` is the
    module ``quant`` calls, whose scale and zero point the op writes its result with.
    """

    op: fx.Node
    activation: fx.Node | None
    bounds: Bounds | None
    quant: fx.Node
    fake_quant: FakeQuant


_ONE_FAKE_QUANT = "an integer op needs exactly one FakeQuant after it (optionally after one relu/relu6/hardtanh/clamp)"


def activation_after(n: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The fused activation of ``n``'s site: ``n``'s only user if it is a `FUSED_ACTIVATIONS` call, else None."""
    return clamp_after(n, gm)


def activation_bounds(n: fx.Node, gm: fx.GraphModule) -> Bounds | Mismatch:
    """The range a relu / relu6 / hardtanh / clamp node clamps to, or why it has none.

    From the module (``nn.Hardtanh(-1, 2)`` → (-1, 2)), else the call's arguments with torch's
    defaults: ``F.hardtanh(x)`` → (-1, 1), ``x.clamp(min=0)`` → (0, inf), ``torch.clamp_max(x, 6)``
    → (-inf, 6). A bound computed in the graph (an fx node) cannot be folded: `Mismatch`.
    """
    kind = canonical_op(n, gm)
    if kind == "relu":
        return Bounds(0.0, math.inf)
    if kind == "relu6":
        return Bounds(0.0, 6.0)
    if kind not in FUSED_ACTIVATIONS:
        return Mismatch(n, kind, "is not a relu/relu6/hardtanh/clamp: it cannot be fused into the op before it")
    mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
    if kind == "hardtanh":
        if mod is not None:
            lo, hi = mod.min_val, mod.max_val
        else:
            lo, hi = call_arg(n, 1, "min_val", -1.0), call_arg(n, 2, "max_val", 1.0)
    else:  # clamp / clamp_min / clamp_max
        name = getattr(n.target, "__name__", str(n.target))
        if "clamp_min" in name:
            lo, hi = call_arg(n, 1, "min", None), None
        elif "clamp_max" in name:
            lo, hi = None, call_arg(n, 1, "max", None)
        else:
            lo, hi = call_arg(n, 1, "min", None), call_arg(n, 2, "max", None)
    if any(isinstance(b, fx.Node) for b in (lo, hi)):
        return Mismatch(n, kind, "has bounds that are not constants: they cannot be folded into an integer op")
    return Bounds(-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


def match_site(op: fx.Node, gm: fx.GraphModule) -> Site | Mismatch:
    """The site ``op → [activation] → FakeQuant`` that ends an integer op (rules 2-3), or what breaks it.

    ``op`` must have users (a dead op has no site). Examples: ``conv → q`` and
    ``conv → relu → q`` match; ``conv → max_pool`` gives ``result reaches 'max_pool2d' without a
    FakeQuant``; ``conv → {q1, q2}`` gives ``result is requantized by more than one FakeQuant``.
    """
    kind = canonical_op(op, gm)
    users = list(op.users)
    activation = activation_after(op, gm)
    if activation is not None:
        bounds = activation_bounds(activation, gm)
        if isinstance(bounds, Mismatch):
            return bounds
        users = list(activation.users)
        if len(users) > 1 and not all(is_fake_quant(u, gm) for u in users):
            return Mismatch(activation, canonical_op(activation, gm),
                            "is a fused activation with more than one user: only its FakeQuant may read it")
    else:
        bounds = None
    if any(u.op == "output" for u in users):
        return Mismatch(op, kind, "result is a model output without a FakeQuant after it: quantize the model output")
    if not users:
        return Mismatch(op, kind, f"result is never requantized (nothing reads it): {_ONE_FAKE_QUANT}")
    outside = [u for u in users if not is_fake_quant(u, gm)]
    if outside:
        return Mismatch(op, kind, f"result reaches '{outside[0].name}' without a FakeQuant: {_ONE_FAKE_QUANT}")
    if len(users) != 1:
        return Mismatch(op, kind, f"result is requantized by more than one FakeQuant: {_ONE_FAKE_QUANT}")
    (quant,) = users
    return Site(op, activation, bounds, quant, gm.get_submodule(str(quant.target)))  # type: ignore[arg-type]


# -- rule 7: integer activations of int-only targets ------------------------------------------------


def softmax_dim(n: fx.Node, gm: fx.GraphModule, ndim: int) -> int | None:
    """The dim (0 ≤ dim < ``ndim``) a softmax normalizes over, or None when it is not a constant.

    ``nn.Softmax(dim=1)`` and ``torch.softmax(x, -3)`` on a 4-d input both give 1; a legacy
    ``dim=None`` is torch's implicit choice (0 for 0-, 1- and 3-d inputs, else 1).
    """
    if n.op == "call_module":
        dim = getattr(gm.get_submodule(str(n.target)), "dim", None)
    else:
        dim = call_arg(n, 1, "dim", None)
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
    if not isinstance(dim, int) or isinstance(dim, bool) or ndim == 0:
        return None
    return dim % ndim


def softmax_output_qparams(qmin: int) -> tuple[float, int]:
    """(scale, zero point) of a softmax output whose scheme's codes start at ``qmin``: real 0 is the lowest code.

    uint8 codes 0…255 give (1/256, 0); int8 codes −128…127 give (1/256, −128), the same real values.
    """
    return SOFTMAX_OUTPUT_SCALE, qmin


def integer_activation_refusal(n: fx.Node, gm: fx.GraphModule, ndim: int) -> str | None:
    """Why a rule-7 op (``ndim``-d input, batch included) cannot run with integer kernels; None when it can.

    The sentence finishes ``node 'name' (kind) ...``. E.g. a softmax over dim 2 of [N, C, H, W]:
    ``normalizes over dim 2 of a 4-d tensor: the integer softmax runs over the channel dim (1) only; ...``.
    """
    kind = canonical_op(n, gm)
    if kind == "softmax":
        dim = softmax_dim(n, gm, ndim)
        if dim is None:
            return "has a dim that is not a constant: the integer softmax needs a fixed dim"
        if ndim < 2 or dim != 1:
            return (f"normalizes over dim {dim} of a {ndim}-d tensor: the integer softmax runs over the channel dim "
                    "(1) of an [N, C] or [N, C, ...] tensor only; move the dim to 1 or choose a target with float "
                    "support")
        if "dtype" in n.kwargs and n.kwargs["dtype"] is not None:
            return "casts to another dtype: the integer softmax writes int8 probabilities only"
        return None
    if kind == "prelu":
        if ndim < 2:
            return "has no channel axis (a 1-d input): the integer prelu runs on [N, C, ...] tensors only"
        if n.op == "call_module":
            return None
        slope = call_arg(n, 1, "weight", None)
        if isinstance(slope, fx.Node) and slope.op == "get_attr":
            return None
        return ("takes its slopes from a computed tensor: only constant slopes (nn.PReLU, or F.prelu of a module "
                "parameter) have an integer kernel")
    return f"is not an integer activation (only {', '.join(sorted(INTEGER_ACTIVATION_KINDS))} are)"
