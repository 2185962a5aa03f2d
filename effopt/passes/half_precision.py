"""Half precision: compute in bf16 or fp16 where the target runs it, in fp32 where the math needs it.

No calibration and no training: every floating weight and activation of the layers that
change is stored in the half dtype and the layer computes in it. What stays in fp32 (with
a cast on each side) is what needs fp32 range or accumulation, by default
(`DEFAULT_KEEP_FLOAT_OPS`):

- softmax / log_softmax: ``exp`` of a logit above 11.1 overflows fp16, and a bf16 sum
  over a long row drops small terms;
- norms' statistics (batch/layer/group/instance/RMS norm): a mean and a variance over many
  values (fold BatchNorms first, ``fold_batchnorm``, and none are left to keep);
- loss-like reductions (sum, var, std, norm, logsumexp, cumsum, prod, the loss functions).

The model's inputs and outputs stay fp32 (cast at the boundary), so users feed it the same
tensors as before. On a CPU target 4-D conv weights and the 4-D input cast are
channels-last, the layout oneDNN's half-precision convs run fast in (``memory_format``).
The pass runs only where the profile lists the dtype (`HalfPrecision.target_support`),
never on an integer-only target such as ``cortex-m7``.

Worked example, ``x → conv → relu → fc → softmax`` with ``dtype: bf16``::

    x ─ to(bf16, channels_last) ─ conv ─ relu ─ fc ─ to(fp32) ─ softmax ─ output
        (cast)                    └──── bf16 ───┘    (cast)     (fp32)

``changed`` lists conv, relu and fc; ``skipped`` lists softmax with its reason; the facts of
conv say ``compute_dtype: bf16``, so the cost model prices it at the profile's bf16 peak.

The rewrite is made on a copy and checked by running it on the IR's example inputs before it
replaces the IR (guard, edit, check): a graph that would fail in half precision leaves the IR
as it was and raises `PassError` naming the node (add it to ``keep_float``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, field_validator
from torch import nn

from effopt.errors import PassError
from effopt.optimizer.ir.analysis import KINDS_BY_CATEGORY, canonical_op
from effopt.optimizer.ir.core import IR, facts, has_facts
from effopt.optimizer.quant.schemes import FakeQuant
from effopt.passes.base import Pass, PassContext, PassOptions, PassResult, Skip

__all__ = [
    "DEFAULT_KEEP_FLOAT_OPS",
    "HALF_TORCH_DTYPES",
    "HalfPrecision",
    "HalfPrecisionOptions",
    "float32_copy",
    "half_dtype_of",
    "is_boundary_cast",
    "preferred_half_dtype",
]

HALF_TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
_HALF_BY_TORCH = {v: k for k, v in HALF_TORCH_DTYPES.items()}

DEFAULT_KEEP_FLOAT_OPS: tuple[str, ...] = (
    "softmax", "log_softmax",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "sum", "var", "std", "norm", "logsumexp", "cumsum", "prod",
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
)
"""Op kinds kept in fp32 by default: they need fp32 range (softmax) or accumulation (statistics, sums)."""

_KNOWN_KINDS: frozenset[str] = frozenset(DEFAULT_KEEP_FLOAT_OPS).union(
    *KINDS_BY_CATEGORY.values(), {"mean", "amax", "amin", "bilinear", "embedding", "conv_transpose"}
)
_CASTS = frozenset({"to", "type_as", "float", "half", "bfloat16", "double", "type"})  # user code's own casts
_OPAQUE = "opaque leaf module (effopt cannot see inside it): kept in fp32"


class HalfPrecisionOptions(PassOptions):
    """Options of the half_precision pass."""

    dtype: Literal["auto", "bf16", "fp16"] = Field(
        "auto", description="bf16 (fp32's range), fp16 (3 more mantissa bits), or auto: the one the target runs fastest, "
        "bf16 on a tie"
    )
    keep_float: tuple[str, ...] = Field((), description="node names or module paths to keep in fp32")
    keep_float_ops: tuple[str, ...] = Field(
        DEFAULT_KEEP_FLOAT_OPS,
        description="op kinds kept in fp32 (default: softmax, norms' statistics, loss-like reductions); [] for none",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="4-D conv layout: auto = channels_last on CPU targets (oneDNN's fast half-precision path)"
    )

    @field_validator("keep_float_ops")
    @classmethod
    def _known(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in kinds if k not in _KNOWN_KINDS]
        if unknown:
            raise ValueError(f"unknown op kind(s) {', '.join(map(repr, unknown))}; use effopt's op kinds as "
                             f"`effopt inspect` shows them, e.g. {', '.join(DEFAULT_KEEP_FLOAT_OPS[:4])}")
        return kinds


def preferred_half_dtype(profile: Any) -> str | None:
    """The half dtype a target runs fastest (bf16 on a tie: fp32's range), or None when it runs neither.

    a100 (bf16 = fp16 = 312e12) → ``"bf16"``; arm-cortex-a (fp16 only) → ``"fp16"``; x86-avx2 → None.
    """
    if profile is None:
        return None
    runs = [d for d in ("bf16", "fp16") if profile.supports(d)]
    return max(runs, key=profile.peak) if runs else None


# -- the plan: which node computes in which dtype ----------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Per compute node: ``half``, ``float`` (kept, with the reason) or ``neutral`` (no float tensors)."""

    half: tuple[fx.Node, ...]
    kept: dict[fx.Node, str]
    neutral: frozenset[fx.Node]


def _floating_out(n: fx.Node) -> bool:
    return has_facts(n) and any(torch.empty((), dtype=getattr(torch, t.dtype)).is_floating_point()
                                for t in facts(n).outputs)


def _plan(ir: IR, o: HalfPrecisionOptions) -> _Plan:
    gm = ir.gm
    half: list[fx.Node] = []
    kept: dict[fx.Node, str] = {}
    neutral: set[fx.Node] = set()
    for n in ir.compute_nodes():
        kind = canonical_op(n, gm)
        mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if n.name in o.keep_float or (mod is not None and _under(str(n.target), o.keep_float)):
            kept[n] = "listed in keep_float"
        elif kind in o.keep_float_ops:
            kept[n] = f"{kind} kept in fp32 (keep_float_ops): it needs fp32 range or accumulation"
        elif mod is not None and hasattr(mod, "effopt_kind"):
            kept[n] = "quantized layer: its precision is the quantize pass's"
        elif mod is not None and kind not in _KNOWN_KINDS:
            kept[n] = _OPAQUE
        elif kind in _CASTS or not _floating_out(n):
            neutral.add(n)
        else:
            half.append(n)
    for target in dict.fromkeys(str(n.target) for n in half if n.op == "call_module"):  # graph order
        sites = ir.users_of_module(target)
        if any(u in kept for u in sites):  # a shared module cannot be in two dtypes at once
            for u in sites:
                if u in half:
                    half.remove(u)
                    kept[u] = f"module '{target}' is shared with a call site kept in fp32"
    kept = {n: kept[n] for n in ir.compute_nodes() if n in kept}  # graph order, for the report
    return _Plan(tuple(half), kept, frozenset(neutral))


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    """``path`` is one of ``prefixes`` or inside one: ``layer1.conv1`` is under ``layer1``."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


# -- the edit -------------------------------------------------------------------------------------------


class _Rewrite:
    """Casts at every dtype boundary, half weights in half layers (run on a copy of the IR's module)."""

    def __init__(self, gm: fx.GraphModule, plan: _Plan, dtype: torch.dtype, channels_last: bool) -> None:
        self.gm, self.graph = gm, gm.graph
        self.dtype, self.channels_last = dtype, channels_last
        self.plan = plan
        self.half_names = {n.name for n in plan.half}
        self.kept_names = {n.name for n in plan.kept}
        self.tracked: dict[fx.Node, str] = {}  # value → "half" | "fp32" (absent: not a float tensor)
        self.casts: dict[tuple[fx.Node, str], fx.Node] = {}
        self.input_ranks: dict[fx.Node, int] = {}
        self.n_casts = 0

    def apply(self, examples: Iterable[torch.Tensor]) -> None:
        inputs = iter(examples)
        nodes = list(self.graph.nodes)
        attr_users = self._attribute_users(nodes)
        for n in nodes:
            if n.op == "placeholder":
                x = next(inputs, None)
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    self.tracked[n] = "fp32"
                    self.input_ranks[n] = x.dim()
            elif n.op == "get_attr":
                self._attribute(n, attr_users[str(n.target)])
            elif n.op == "output":
                self._retype_inputs(n, "fp32")
            elif n.name in self.half_names:
                self._retype_inputs(n, "half")
                if n.op == "call_module":
                    self._convert_module(self.gm.get_submodule(str(n.target)))
                self.tracked[n] = "half"
            elif n.name in self.kept_names:
                self._retype_inputs(n, "fp32")
                if _floating_out(n):
                    self.tracked[n] = "fp32"
            elif _floating_out(n):  # neutral: a user's own cast (x.float()) keeps the dtype it had
                self.tracked[n] = "fp32"

    def _attribute_users(self, nodes: list[fx.Node]) -> dict[str, list[fx.Node]]:
        users: dict[str, list[fx.Node]] = {}
        for n in nodes:
            if n.op == "get_attr":
                users.setdefault(str(n.target), []).extend(n.users)
        return users

    def _attribute(self, n: fx.Node, users: list[fx.Node]) -> None:
        value = _get_attr(self.gm, str(n.target))
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        if users and all(u.name in self.half_names for u in users):
            fmt = torch.channels_last if self.channels_last and value.dim() == 4 else torch.contiguous_format
            _set_attr(self.gm, str(n.target), value.detach().to(dtype=self.dtype, memory_format=fmt))
            self.tracked[n] = "half"
        else:
            self.tracked[n] = "fp32"

    def _convert_module(self, mod: nn.Module) -> None:
        mod.to(self.dtype)
        if self.channels_last and isinstance(mod, nn.modules.conv._ConvNd) and mod.weight.dim() == 4:
            mod.to(memory_format=torch.channels_last)

    def _retype_inputs(self, n: fx.Node, want: str) -> None:
        for a in list(n.all_input_nodes):
            have = self.tracked.get(a)
            if have is not None and have != want:
                n.replace_input_with(a, self._cast(a, want, before=n))

    def _cast(self, value: fx.Node, want: str, before: fx.Node) -> fx.Node:
        """``value.to(dtype)``, made once per (value, dtype) right before its first user; a 4-D graph
        input gets the channels-last layout with its half cast."""
        key = (value, want)
        if key not in self.casts:
            kwargs: dict[str, object] = {"dtype": self.dtype if want == "half" else torch.float32}
            if want == "half" and self.channels_last and self.input_ranks.get(value) == 4:
                kwargs["memory_format"] = torch.channels_last
            with self.graph.inserting_before(before):
                cast = self.graph.call_method("to", (value,), kwargs)
            self.tracked[cast] = want
            self.casts[key] = cast
            self.n_casts += 1
        return self.casts[key]


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if isinstance(getattr(parent, name), nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(parent, name, value)


# -- the check ---------------------------------------------------------------------------------------------


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the floating outputs of the named nodes (for per-layer error)."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.seen = names, {}
        self.failed_at: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception:
            self.failed_at = self.failed_at or n
            raise
        if n.name in self.names and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.seen[n.name] = out.detach()
        return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got − want|| / ||want||`` in float64 (0 when both are 0).

    >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))   # 0.5 / 5.41
    0.0924...
    """
    g, w = got.double(), want.double()
    norm = float(w.norm())
    diff = float((g - w).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _layer_errors(before: fx.GraphModule, after: fx.GraphModule, names: set[str],
                  examples: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Relative error of each named node's output, half graph vs fp32 graph, on the example inputs."""
    ref, got = _Recorder(before, names), _Recorder(after, names)
    with torch.no_grad():
        ref.run(*examples)
        try:
            got.run(*examples)
        except Exception as e:
            where = got.failed_at.name if got.failed_at is not None else "?"
            raise PassError(
                f"half_precision: the half-precision graph fails at node '{where}': {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; add '{where}' to keep_float"
            ) from e
    return {k: relative_error(got.seen[k], ref.seen[k]) for k in got.seen if k in ref.seen}


# -- the pass -------------------------------------------------------------------------------------------------


class HalfPrecision(Pass):
    name: ClassVar[str] = "half_precision"
    summary: ClassVar[str] = ("bf16/fp16 compute where the target runs it; softmax, norms' statistics and loss-like "
                              "reductions stay fp32; fp32 inputs and outputs.")
    Options = HalfPrecisionOptions
    after: ClassVar[tuple[str, ...]] = ("fold_batchnorm", "quantize")
    lossy: ClassVar[bool] = True

    options: HalfPrecisionOptions

    def target_support(self, profile: Any) -> str | None:
        d = self.options.dtype
        if (d == "auto" and preferred_half_dtype(profile) is not None) or profile.supports(d):
            return None
        runs = ", ".join(profile.supported_dtypes)
        d = "bf16 or fp16" if d == "auto" else d
        if profile.integer_only:
            return (f"{profile.name} is integer-only (it runs {runs}): no float layer runs there; "
                    "use quantize instead")
        other = "fp16" if d == "bf16" else "bf16"
        if d != "bf16 or fp16" and profile.supports(other):
            return f"{profile.name} has no {d} compute (it runs {runs}); use dtype: {other}"
        return (f"{profile.name} has no {d} compute (it runs {runs}): half precision would be converted to fp32 "
                f"and back around every op, slower than fp32; choose a target whose profile lists {d} (e.g. a100), "
                "or `effopt profile-host` on a CPU with native half precision (AVX512-BF16, AMX)")

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        o = self.options
        if ctx.profile is not None:
            why_not = self.target_support(ctx.profile)
            if why_not:
                raise PassError(f"half_precision (dtype: {o.dtype}) cannot run for target {ctx.profile.name}: {why_not}")
        dtype = o.dtype if o.dtype != "auto" else (preferred_half_dtype(ctx.profile) or "bf16")
        if any(isinstance(m, FakeQuant) for m in ir.gm.modules()):
            return PassResult(ir, skipped=(Skip("(model)", "already quantized: quantize's mixed_precision promotes "
                                                "sensitive layers to bf16/fp16 itself (mixed_precision: true)"),))
        plan = _plan(ir, o)
        skipped = tuple(Skip(n.name, why) for n, why in plan.kept.items())
        if not plan.half:
            return PassResult(ir, skipped=skipped)
        channels_last = _channels_last(o, ctx.profile, plan)
        gm = copy.deepcopy(ir.gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        copied = _Plan(tuple(by_name[n.name] for n in plan.half), {by_name[n.name]: r for n, r in plan.kept.items()},
                       frozenset(by_name[n.name] for n in plan.neutral))
        rewrite = _Rewrite(gm, copied, HALF_TORCH_DTYPES[dtype], channels_last)
        rewrite.apply(ir.example_inputs)
        gm.graph.lint()
        gm.recompile()
        errors = _layer_errors(ir.gm, gm, {n.name for n in plan.half}, ir.example_inputs)
        _check_boundary(ir, gm)
        out = IR(gm, ir.inputs, ir.example_inputs)
        stats = {"half_nodes": float(len(plan.half)), "fp32_nodes": float(len(plan.kept)),
                 "casts": float(rewrite.n_casts)}
        warnings = [f"{len(plan.half)} node(s) compute in {dtype}, {len(plan.kept)} stay fp32, "
                    f"{rewrite.n_casts} cast(s) at the dtype boundaries; inputs and outputs stay fp32"]
        if channels_last:
            warnings.append("4-D conv weights and the 4-D input cast are channels-last (memory_format: "
                            f"{o.memory_format}), the layout oneDNN runs {dtype} convs fast in")
        worst = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        if worst:
            warnings.append("largest relative error vs fp32 on the example input: "
                            + ", ".join(f"'{k}' {v:.2%}" for k, v in worst))
        return PassResult(out, tuple(n.name for n in plan.half), skipped, stats, tuple(warnings))


def _channels_last(o: HalfPrecisionOptions, profile: Any, plan: _Plan) -> bool:
    if o.memory_format != "auto":
        return o.memory_format == "channels_last"
    cpu = profile is not None and getattr(profile, "kind", None) == "cpu"
    return cpu and any(has_facts(n) and facts(n).op_kind == "conv" and len(facts(n).outputs[0].shape) == 4
                       for n in plan.half)


def _check_boundary(ir: IR, gm: fx.GraphModule) -> None:
    """The rewritten model takes and returns what the original did (fp32 at the boundary)."""
    from effopt.optimizer.ir.compare import output_tensors

    with torch.no_grad():
        want = [t.dtype for t in output_tensors(ir.gm(*ir.example_inputs))]
        got = [t.dtype for t in output_tensors(gm(*ir.example_inputs))]
    if want != got:
        raise PassError(f"half_precision: the rewritten model returns {got}, the original {want}; "
                        "this is a bug in the pass (the output casts are missing)")


# -- helpers for the artefact stage: which half dtype a model holds, and its fp32 twin ---------------------


def is_boundary_cast(n: fx.Node) -> bool:
    """A float-to-float ``.to(dtype=...)`` between half and fp32 (what this pass inserts)."""
    if n.op != "call_method" or n.target != "to" or n.args[1:] or set(n.kwargs) - {"dtype", "memory_format"}:
        return False
    if n.kwargs.get("dtype") not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return not has_facts(n) or all(t.dtype in ("float32", "bfloat16", "float16") for t in facts(n).inputs)


def half_dtype_of(module: nn.Module) -> str | None:
    """``"bf16"``/``"fp16"`` when ``module`` computes in a half dtype (a weight or a boundary cast says so), else None."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dtype in _HALF_BY_TORCH:
            return _HALF_BY_TORCH[t.dtype]
    graph = getattr(module, "graph", None)
    for n in graph.nodes if isinstance(graph, fx.Graph) else ():
        if is_boundary_cast(n) and n.kwargs["dtype"] in _HALF_BY_TORCH:
            return _HALF_BY_TORCH[n.kwargs["dtype"]]
    return None


def float32_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a half-precision graph that computes in fp32: weights widened (exactly), boundary casts removed.

    The weights keep their half-rounded values, so the copy is the half model without the
    rounding of activations: what an fp32 runtime (an fp32 ONNX) runs. E.g. a bf16 weight
    0.1015625 stays 0.1015625 in fp32.
    """
    out = copy.deepcopy(gm)
    for n in list(out.graph.nodes):
        if is_boundary_cast(n):
            n.replace_all_uses_with(n.args[0])
            out.graph.erase_node(n)
    for m in out.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.dtype in _HALF_BY_TORCH:
                setattr(m, name, nn.Parameter(p.detach().float().contiguous(), requires_grad=False))
        for name, b in list(m.named_buffers(recurse=False)):
            if b.dtype in _HALF_BY_TORCH:
                m.register_buffer(name, b.float().contiguous())
    for name, value in list(vars(out).items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.dtype in _HALF_BY_TORCH:
            setattr(out, name, value.float().contiguous())
    out.graph.lint()
    out.recompile()
    return out
