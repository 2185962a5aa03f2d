"""Run a quantized graph on PyTorch's own x86 int8 kernels.

The ``model.pt2`` effopt emits for a quantized model holds
``torch.ops.quantized_decomposed`` quantize/dequantize reference ops: exact quantized
semantics, but eager PyTorch computes them in float (about 4x *slower* than the float
model). This torch build also has real int8 kernels for x86 (the ``x86`` quantized engine,
fbgemm with oneDNN behind it): ``torch.ao.nn.quantized`` conv/linear modules with packed
int8 weights, ``quantized::add``/``add_relu``/``mul``/``cat``, and max pool, average pool,
flatten and views that work on ``quint8`` tensors. `lower_to_torch_int8` rebuilds a graph
that follows the quantized-graph contract (`effopt.optimizer.quant.contract`) from those
kernels, with exactly effopt's calibrated parameters; `effopt.optimizer.emit.torchscript` saves it
as a TorchScript archive that ``torch.jit.load`` runs without effopt or the user's code.

How: `effopt.optimizer.lower.torch_int8_graph` walks the graph (its docstring has the op-by-op
mapping): every contract site becomes one torch int8 kernel with the FakeQuant's scale and zero
point (a fused relu picks the ConvReLU / add_relu kernel, relu6 / hardtanh / clamp clamp the int8
result), pass-through and tied ops run on the quint8 tensor, and the odd op without an exact
int8 kernel (a mean, a global average pool with new output parameters) is computed in float
between a dequantize and a quantize, listed by `Int8Summary`.

Numerics: each int8 layer matches its fake-quant counterpart to one output code except where
float round-off meets a rounding tie; small nets' logits stay within 1 output step (measurements
for deeper nets in ``docs/quantization.md``). On CPUs without VNNI (AVX2 only), fbgemm's u8·s8
pair sums can saturate int16 when activation and weight codes are both near full range, so
`lower_to_torch_int8` runs the lowered module against the fake-quant graph on the example inputs
and gives `Unsupported` past ``max_relative_error``.

What returns `Unsupported` (each reason names the node): float ops between quantized ops
(e.g. a gelu between two quantized convs; torch has no int8 kernel for it), layers the
quantize pass kept in float (mixed precision, weight-only or dynamic mode), activation
quantizers that are not 8-bit unsigned per tensor (the x86 kernels take ``quint8`` with
codes 0..255), asymmetric weights, convs padded other than with zeros or with string padding,
transposed convs, a quantized result that breaks its site (`effopt.optimizer.quant.contract.match_site`),
and kernels that fail on the example inputs. Float ops before the first quantizer or after the
last quantized op are fine: they run in float on dequantized values.

Both torch.jit and quantized tensors print deprecation warnings in torch 2.13
(pytorch/pytorch#184982): this path works today but is on its way out (why the non-deprecated
AOTInductor route is not used: ``docs/quantization.md``). Saving the lowered module as a
TorchScript archive is `effopt.optimizer.emit.torchscript`.

Example::

    lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
    if isinstance(lowered, Unsupported):
        note = f"quantize/dequantize reference ops: {lowered}"
    else:
        save_torchscript(lowered, out / "model_int8.pt", ir.example_inputs)  # emit.torchscript
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from effopt.errors import EmitError
from effopt.optimizer.lower.torch_int8_graph import TorchInt8Lowering
from effopt.optimizer.quant.contract import is_fake_quant
from effopt.optimizer.quant.schemes import FakeQuant
from effopt.optimizer.ir.trace import raise_if_interrupted

__all__ = [
    "TORCH_INT8_NOTE",
    "Int8Agreement",
    "Int8Summary",
    "Unsupported",
    "int8_agreement",
    "int8_engine",
    "int8_summary",
    "lower_to_torch_int8",
    "quantized_engine",
    "quiet_torch_warnings",
]

#: What the report says about ``model_int8.pt`` when the lowering succeeds.
TORCH_INT8_NOTE = "x86 int8 kernels (fbgemm) via TorchScript"

#: Engines with the x86 int8 kernels, preferred first.
X86_ENGINES: tuple[str, ...] = ("x86", "fbgemm")

@dataclass(frozen=True)
class Unsupported:
    """Why a graph cannot run on torch's int8 kernels; one reason per offending node.

    Example: ``Unsupported(("node 'gelu_quant' (FakeQuant) requantizes a value computed in float from
    int8 values (float op gelu (gelu)): ...",))``. ``str()`` joins the reasons; `short` keeps a few.
    """

    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return "; ".join(self.reasons)

    def short(self, limit: int = 3) -> str:
        """The first ``limit`` reasons and how many more, for a one-line report note."""
        more = len(self.reasons) - limit
        return "; ".join(self.reasons[:limit]) + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True)
class Int8Agreement:
    """How the int8 module's outputs compare with the fake-quant graph's (first output).

    ``output_step`` is the output FakeQuant's scale, so ``max_abs_err / output_step`` is the
    error in output codes: 2.0 means two quantization steps. ``top1`` is the argmax agreement
    for 2-D outputs with more than one column, else None.
    """

    max_abs_err: float
    output_step: float | None
    top1: float | None
    samples: int

    @property
    def max_steps(self) -> float | None:
        return None if not self.output_step else self.max_abs_err / self.output_step


# -- the quantized engine --------------------------------------------------------------------------


def int8_engine() -> str | None:
    """The quantized engine with x86 int8 kernels in this torch build (``"x86"``, else ``"fbgemm"``), or None."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in X86_ENGINES if e in supported), None)


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` to ``name`` for the block, then restore the caller's engine.

    The engine decides how weights are packed when a quantized module is built (and when a
    TorchScript archive is loaded), so the lowering builds its modules inside this.
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def quiet_torch_warnings() -> Iterator[None]:
    """Library code does not print: torch 2.13 warns that quantized tensors and torch.jit are deprecated
    (the module docstring says so), and TorchScript warns about an annotation in GraphModule.__init__."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated.*")
        warnings.filterwarnings("ignore", message=".*instance-level annotations on empty non-base types.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


@dataclass(frozen=True)
class Int8Summary:
    """What a lowered module runs where: ``int8`` op kinds in graph order, and ``float_ops``, the
    ops computed in float between int8 ops (exact detours such as a global average pool with new
    output parameters, and with ``float_islands`` any float op), as ``"name (kind)"``.

    ``str()`` is the report note, e.g. for ResNet-18 ``"x86 int8 kernels (fbgemm) via TorchScript:
    conv 20, add 8, linear 1 in int8; float between int8 ops: avgpool (adaptive_avg_pool)"``.
    """

    int8: tuple[str, ...]
    float_ops: tuple[str, ...] = ()

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for k in self.int8:
            counts[k] = counts.get(k, 0) + 1
        text = f"{TORCH_INT8_NOTE}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " in int8"
        if self.float_ops:
            text += "; float between int8 ops: " + ", ".join(self.float_ops)
        return text


SUMMARY_KEY = "effopt_torch_int8"


def int8_summary(lowered: fx.GraphModule) -> Int8Summary:
    """The `Int8Summary` `lower_to_torch_int8` stored in the lowered module's ``meta``."""
    summary = lowered.meta.get(SUMMARY_KEY)
    if not isinstance(summary, Int8Summary):
        raise EmitError("int8_summary: this module was not made by lower_to_torch_int8; lower the quantized graph "
                        "first")
    return summary


def lower_to_torch_int8(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    engine: str | None = None,
    max_relative_error: float = 0.25,
    float_islands: bool = False,
) -> fx.GraphModule | Unsupported:
    """A GraphModule that runs ``gm`` (quantized-graph contract) on torch's x86 int8 kernels, or why not.

    Shapes come from ``gm``'s facts (annotated with ``example_inputs`` if it has none); the
    example inputs also run through ``gm`` and the lowered module once as a check: a kernel that fails, or outputs whose relative L2 error
    against ``gm`` (eval mode) exceeds ``max_relative_error``, give `Unsupported` rather than a
    wrong artefact. The bound is loose on purpose: it catches a wrong kernel or saturation,
    not the rounding drift of deep nets (0.06 on a random-weight ResNet-18, where onnxruntime's
    int8 kernels drift 0.14); use `int8_agreement` on real data for the report. ``engine``
    defaults to `int8_engine`; it is set only while the modules are built and checked, then
    the caller's engine is restored.
    ``float_islands=True`` runs float ops between quantized ops in float (dequantize → op →
    quantize, what the Q/DQ pt2 does for every op) instead of giving up; `int8_summary` lists them.
    ``gm`` is not changed (its train/eval mode is restored).

    Example (DigitsNet after fold_batchnorm, eliminate_dead_code, quantize)::

        lowered = lower_to_torch_int8(ir.gm, ir.example_inputs)
        lowered(x)               # float logits, within 1 output step of ir.gm.eval()(x)
        str(int8_summary(lowered))
        # 'x86 int8 kernels (fbgemm) via TorchScript: conv 3, linear 2 in int8; float between int8 ops:
        #  gap (adaptive_avg_pool)'
    """
    engine = engine or int8_engine()
    if engine is None:
        return Unsupported((f"this torch build has no x86 int8 engine (supported: "
                            f"{torch.backends.quantized.supported_engines})",))
    if not any(is_fake_quant(n, gm) for n in gm.graph.nodes):
        return Unsupported(("the model has no quantized activations (no FakeQuant in the graph; weight-only or dynamic "
                            "quantization): nothing runs in int8",))
    was_training = gm.training
    gm.eval()
    try:
        with quantized_engine(engine), quiet_torch_warnings(), torch.no_grad():
            reference = gm(*example_inputs)
            lowering = TorchInt8Lowering(gm, example_inputs, float_islands)
            lowering.run()
            if lowering.problems:
                return Unsupported(tuple(lowering.problems))
            if not lowering.int8_kinds:
                return Unsupported(("no conv, linear, add, mul, matmul, cat or pool runs in int8: nothing to lower",))
            lowering.graph.lint()
            name = f"EffoptInt8Module_{_content_digest(lowering.root, lowering.graph)}"
            lowered = fx.GraphModule(lowering.root, lowering.graph, class_name=name).eval()
            lowered.meta[SUMMARY_KEY] = Int8Summary(tuple(lowering.int8_kinds), tuple(lowering.float_ops))
            failure = _check(lowered, example_inputs, reference, max_relative_error)
    finally:
        gm.train(was_training)
    return Unsupported((failure,)) if failure else lowered


def _content_digest(root: nn.Module, graph: fx.Graph) -> str:
    """12 hex digits of the lowered code and weights: the TorchScript class name's suffix.

    TorchScript renames (``___torch_mangle_N``) a class whose qualified name it has compiled
    before in this process, and the archive records the name; with one name per content, the
    class name does not depend on which other models the process saved before (an identical
    model saved twice still gets the renamed class the second time).
    """
    digest = hashlib.sha256(graph.python_code("self").src.encode())
    buffer = io.BytesIO()
    torch.save(root.state_dict(), buffer)
    digest.update(buffer.getvalue())
    return digest.hexdigest()[:12]


def _check(lowered: fx.GraphModule, inputs: Sequence[torch.Tensor], reference: Any,
           max_relative_error: float) -> str | None:
    """None if ``lowered`` runs and agrees with ``reference``; else what went wrong, naming the node.

    Agreement is the relative L2 error of all outputs joined (`effopt.optimizer.ir.compare`)."""
    from effopt.optimizer.ir.compare import compare_tensors, concat_flat, output_tensors

    runner = _NodeNamingInterpreter(lowered)
    try:
        out = runner.run(*inputs)
    except Exception as e:  # any kernel failure: the caller falls back to the Q/DQ artefact
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
        where = f" at node '{runner.current.name}'" if runner.current is not None else ""
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"the int8 module fails on the example inputs{where}: {type(e).__name__}: {first_line}"
    ref, got = output_tensors(reference), output_tensors(out)
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return "the int8 module's outputs do not have the fake-quant graph's shapes"
    error = compare_tensors(concat_flat(got), concat_flat(ref)).relative_l2
    if not math.isfinite(error) or error > max_relative_error:
        return (f"the int8 module's outputs differ from the fake-quant graph by {error:.3g} (relative L2) on the "
                f"example inputs, over the {max_relative_error:g} allowed: the int8 kernels disagree with effopt's "
                "quantization here (on CPUs without VNNI, fbgemm's 16-bit pair sums may saturate)")
    return None


class _NodeNamingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _output_step(gm: fx.GraphModule) -> float | None:
    """The largest scale of the FakeQuants that feed the graph output (one output code), or None."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    steps = [float(m.frozen_scale) for a in out.all_input_nodes if a.op == "call_module"
             for m in [gm.get_submodule(str(a.target))] if isinstance(m, FakeQuant)]
    return max(steps) if steps else None


_quiet_torch_warnings = quiet_torch_warnings  # the name int8_agreement's body uses


# -- agreement ------------------------------------------------------------------------------------


def int8_agreement(
    reference: nn.Module, int8: Callable[..., Any], batches: Iterable[Sequence[torch.Tensor]]
) -> Int8Agreement:
    """Compare the first output of ``int8`` with the fake-quant ``reference`` (eval mode) over ``batches``.

    The batches are joined and compared once (`effopt.optimizer.ir.compare.compare_tensors`),
    so top-1 is over every sample."""
    from effopt.optimizer.ir.compare import compare_tensors, concat_batches, output_tensors

    step = _output_step(reference) if isinstance(reference, fx.GraphModule) else None
    was_training = reference.training
    reference.eval()
    refs: list[list[torch.Tensor]] = []
    outs: list[list[torch.Tensor]] = []
    try:
        with torch.no_grad(), _quiet_torch_warnings():
            for inputs in batches:
                refs.append(output_tensors(reference(*inputs))[:1])
                outs.append(output_tensors(int8(*inputs))[:1])
    finally:
        reference.train(was_training)
    if not refs:
        return Int8Agreement(0.0, step, None, 0)
    agreement = compare_tensors(concat_batches(outs)[0], concat_batches(refs)[0])
    return Int8Agreement(agreement.max_abs_err, step, agreement.top1_agreement, agreement.samples)

