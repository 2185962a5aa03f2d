"""Emit a torch model as a clean, checked, byte-deterministic ONNX file, and check it in onnxruntime.

Why this module exists: the dynamo ONNX exporter (``torch.onnx.export(dynamo=True)``) gives a
correct graph, but one that is not ready to ship as an artefact:

- it records provenance per node and per value (``pkg.torch.onnx.stack_trace`` with absolute
  source paths and line numbers, ``pkg.torch.onnx.fx_node``), so the bytes depend on where the
  code that built the model lives; the same recipe must give byte-identical artefacts
  (STYLE rule 15), so all ``doc_string`` and ``metadata_props`` fields are stripped;
- a batch dimension of size 1 in the example input can be specialised to a constant, so
  dynamic-batch inputs are exported from a batch-2 copy;
- when ``forward`` pins the batch, it does not fail but silently re-exports with a fixed
  batch (see ``_check_dynamic_batch``), so the input shapes are checked after export;
- it prints and logs (the torchvision notice, FutureWarnings, a partial FX graph on stderr when
  ``torch.export`` fails), while library code must stay quiet (STYLE rule 19).

Pipeline, each step a small function::

    torch module --_torch_to_onnx--> ModelProto --_clean_graph--> --_strip_debug_info-->
        --_serialize + _check_model--> bytes --_write_atomic--> path

Example::

    path = export_onnx(model, (torch.randn(1, 3, 32, 32),), ["image"], [True], Path("m.onnx"))
    (logits,) = run_onnx(path, [np.zeros((5, 3, 32, 32), np.float32)])   # batch 5 works too
    compare_onnx(path, model, [(torch.randn(5, 3, 32, 32),)], rtol=1e-4, atol=1e-5).passed  # True
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx_graphsurgeon.logger import G_LOGGER

from effopt.errors import EmitError
from effopt.optimizer.measure.verify import elementwise_errors

__all__ = ["OnnxAgreement", "compare_onnx", "export_onnx", "open_session", "run_onnx"]

# Loggers that the exporter stack writes warnings through (e.g. "torchvision is not installed.
# Skipping torchvision::nms" from torch.onnx._internal.exporter._registration, or torch.export's
# exportdb message on failure). They are raised for the duration of one export and restored.
_NOISY_LOGGERS: tuple[str, ...] = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "onnxscript",
    "onnx_ir",
)

# Export range for the shared batch symbol. The ONNX graph itself only records the name
# "batch", so onnxruntime accepts any batch; the range only bounds what torch.export assumes.
_BATCH_MIN = 1
_BATCH_MAX = 4096

# gs.fold_constants would otherwise materialise e.g. a constant Expand into a tensor of any
# size; larger results stay as computed nodes (onnxruntime folds them at load time anyway).
_FOLD_SIZE_THRESHOLD_BYTES = 16 * 2**20

# Fields that carry provenance (stack traces with absolute paths, FX node reprs) rather than
# semantics; every message that has them loses them.
_DEBUG_FIELDS: tuple[str, ...] = ("doc_string", "metadata_props")

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

_PT2_HINT = "pass formats: [pt2] to skip ONNX"


@dataclass(frozen=True)
class OnnxAgreement:
    """How closely onnxruntime reproduces torch, over every output of every input tuple.

    ``max_rel_err`` is ``max|a - b| / max|b|`` per output (b = torch), then the worst output:
    scale-aware without the blow-ups of an element-wise ``|a - b| / |b|`` near zeros. E.g.
    torch ``[10, -20]`` vs onnx ``[10.001, -20]`` gives max_abs_err 1e-3, max_rel_err 5e-5.
    ``passed`` is ``np.allclose(onnx, torch, rtol, atol)`` for every output.
    """

    max_abs_err: float
    max_rel_err: float
    passed: bool


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    dynamic_batch: Sequence[bool],
    path: Path,
    opset: int | None = None,
    optimize_qdq: bool = True,
) -> Path:
    """Export ``module`` to a checked ONNX file at ``path`` and return ``path``.

    A quantized module's Q/DQ graph is then optimized for onnxruntime's int8 kernels
    (`effopt.optimizer.lower.onnx_qdq.optimize_qdq_model`), and the Linears of a dynamically
    quantized one (``quantize`` with ``mode: dynamic``) become onnxruntime's dynamic int8
    MatMuls (`effopt.optimizer.lower.onnx_dynamic`), unless ``optimize_qdq`` is False.

    The module is exported in eval mode (BatchNorm uses running statistics, dropout is off)
    and its train/eval flags are restored afterwards. Dynamic-batch inputs share one batch
    symbol named ``batch``; if the exporter could only produce a fixed batch, this raises
    rather than ship a file that fails at any other batch size. Graph inputs are named
    ``input_names``; outputs keep the exporter's names (e.g. ``linear``, ``relu``). The bytes
    depend only on the module's graph, weights and these arguments (not on file paths, the
    process or hash seeds), so two exports compare equal byte for byte.
    The file is written to ``<path>.tmp`` and renamed, so a reader never sees half a file.

    Raises:
        EmitError: bad arguments, the exporter failed or fixed a dynamic batch, or the result
            fails ``onnx.checker``.
    """
    _validate_export_args(module, example_inputs, input_names, dynamic_batch)
    args, dynamic_shapes = _export_args(example_inputs, dynamic_batch)
    where = f"model {type(module).__name__!r}"
    with _dynamic_export_form(module, optimize_qdq) as dynamic_weights:
        model = _torch_to_onnx(module, args, input_names, dynamic_shapes, opset, optimize=True)
    _check_dynamic_batch(model, input_names, dynamic_batch, where)
    model = _clean_graph(model, where)
    if optimize_qdq and _has_qdq(model):
        model = _optimize_qdq(model, where)
    if dynamic_weights:
        model = _dynamic_quantize(model, dynamic_weights, where)
    model = _compact(_strip_debug_info(model))
    data = _serialize(model, where)
    _check_model(data, where=f"{where} -> {path}")
    return _write_atomic(data, path)


def run_onnx(path: Path, inputs: Sequence[np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """Run the ONNX file at ``path`` on CPU and return its outputs in graph order.

    Inputs are fed by position (graph input order). The session uses ``threads`` intra-op
    threads, one inter-op thread and sequential execution, so repeated runs on one machine
    give identical results, which verification and benchmarks rely on.

    Raises:
        EmitError: onnxruntime cannot load the file or run it on these inputs.
    """
    return _run_session(open_session(path, threads), inputs, path)


def onnx_runner(path: Path, threads: int = 1) -> Callable[..., tuple[torch.Tensor, ...]]:
    """One session on ``path`` as a function from torch inputs to the tuple of torch outputs.

    Raises:
        EmitError: onnxruntime cannot load the file (now) or run it on the inputs (when called).
    """
    session = open_session(path, threads)

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = _run_session(session, [_to_numpy(t) for t in inputs], path)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs)

    return run


def compare_onnx(
    path: Path,
    module: torch.nn.Module,
    inputs: Sequence[tuple[torch.Tensor, ...]],
    rtol: float,
    atol: float,
) -> OnnxAgreement:
    """Run every input tuple through ``module`` (eval, no_grad) and the ONNX file; compare.

    Tuple/list/dict outputs are flattened in order and matched to the ONNX outputs by position.
    A different number of outputs or a different shape is an emit defect, not a tolerance
    question, so it raises instead of returning ``passed=False``.

    Raises:
        EmitError: no inputs, onnxruntime fails, or output counts/shapes do not match.
    """
    if len(inputs) == 0:
        raise EmitError(f"{path}: compare_onnx got no input tuples; pass at least one batch to compare")
    session = open_session(path, threads=1)
    max_abs = 0.0
    max_rel = 0.0
    passed = True
    for index, args in enumerate(inputs):
        with _eval_mode(module), torch.no_grad():
            expected = _flatten_outputs(module(*args), where=f"model {type(module).__name__!r} output")
        actual = _run_session(session, [_to_numpy(t) for t in args], path)
        _check_output_structure(actual, expected, where=f"{path}: input tuple {index}")
        for got, ref in zip(actual, expected, strict=True):
            got64, ref64 = got.astype(np.float64), ref.astype(np.float64)  # bool/int outputs too
            abs_err, rel_err, within = _errors(got64, ref64, rtol, atol)
            max_abs = max(max_abs, abs_err)
            max_rel = max(max_rel, rel_err)
            passed = passed and within
    return OnnxAgreement(max_abs_err=max_abs, max_rel_err=max_rel, passed=passed)


# --- export ---------------------------------------------------------------------------------


def _validate_export_args(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    dynamic_batch: Sequence[bool],
) -> None:
    """Reject argument mistakes before the (slow, noisy) exporter runs."""
    where = f"model {type(module).__name__!r}"
    n = len(example_inputs)
    if len(input_names) != n or len(dynamic_batch) != n:
        raise EmitError(
            f"{where}: {n} example inputs but {len(input_names)} input_names and "
            f"{len(dynamic_batch)} dynamic_batch flags; give one name and one flag per input"
        )
    if len(set(input_names)) != n:
        raise EmitError(f"{where}: input_names {list(input_names)} has duplicates; give each input its own name")
    for name, tensor, dynamic in zip(input_names, example_inputs, dynamic_batch, strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise EmitError(f"{where}: input '{name}' is {type(tensor).__name__}, not a torch.Tensor")
        if dynamic and tensor.dim() == 0:
            raise EmitError(
                f"{where}: input '{name}' is a 0-d tensor and has no batch dimension; "
                "set its dynamic_batch flag to false"
            )
    batches = sorted({int(t.shape[0]) for t, d in zip(example_inputs, dynamic_batch, strict=True) if d})
    if len(batches) > 1:
        raise EmitError(
            f"{where}: dynamic-batch inputs share one batch symbol but the examples have batch "
            f"sizes {batches}; give them the same batch size or mark some dynamic_batch false"
        )


def _export_args(
    example_inputs: tuple[torch.Tensor, ...], dynamic_batch: Sequence[bool]
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, torch.export.Dim] | None, ...] | None]:
    """Example inputs and ``dynamic_shapes`` for torch.export.

    torch.export specialises a size-1 dimension to the constant 1 ("You marked batch as
    dynamic but your code specialized it") unless ``backed_size_oblivious`` is on, which
    torch.onnx.export turns on in torch 2.13 but not in every release. So dynamic inputs with
    batch 1 are repeated to batch 2 (dtype kept); the exported graph is the same either way.
    One ``Dim`` object is shared so all inputs get the same symbol.
    E.g. shapes ``(1, 3, 8, 8)`` and ``(1, 4)`` with flags ``[True, False]`` give
    ``(2, 3, 8, 8)``, ``(1, 4)`` and ``({0: batch}, None)``.
    """
    if not any(dynamic_batch):
        return tuple(example_inputs), None
    batch = torch.export.Dim("batch", min=_BATCH_MIN, max=_BATCH_MAX)
    args = tuple(
        _repeat_batch(t, 2) if dynamic and t.shape[0] == 1 else t
        for t, dynamic in zip(example_inputs, dynamic_batch, strict=True)
    )
    shapes = tuple({0: batch} if dynamic else None for dynamic in dynamic_batch)
    return args, shapes


def _repeat_batch(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """``tensor`` repeated ``times`` along dim 0: a real copy (not a stride-0 view), same dtype."""
    return tensor.repeat((times,) + (1,) * (tensor.dim() - 1))


def _torch_to_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    dynamic_shapes: tuple[dict[int, torch.export.Dim] | None, ...] | None,
    opset: int | None,
    optimize: bool,
) -> onnx.ModelProto:
    """Run the dynamo exporter quietly, in eval mode, and return its raw ModelProto.

    ``optimize`` is the exporter's own onnxscript optimizer (constant folding, BN-into-Conv
    fusion); tests turn it off to see what the graphsurgeon cleanup alone removes.
    """
    try:
        with _eval_mode(module), quiet_third_party():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                external_data=False,
                input_names=list(input_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many unrelated types; all mean "no ONNX"
        raise EmitError(_export_failure_message(type(module).__name__, e)) from e
    if program is None:
        raise EmitError(f"model {type(module).__name__!r}: torch.onnx.export returned no program; {_PT2_HINT}")
    return _rename_inputs(program.model_proto, input_names, where=f"model {type(module).__name__!r}")


def _rename_inputs(model: onnx.ModelProto, input_names: Sequence[str], where: str) -> onnx.ModelProto:
    """``model`` with graph inputs called ``input_names``; the exporter usually already did it.

    Kept as a guard because the exporter's ``input_names`` handling has changed between torch
    releases. When the names already match, ``model`` itself comes back; otherwise a renamed copy.
    """
    current = [value.name for value in model.graph.input]
    if current == list(input_names):
        return model
    if len(current) != len(input_names):
        raise EmitError(
            f"{where}: ONNX graph has inputs {current} but {len(input_names)} input_names "
            f"{list(input_names)} were given; give one name per tensor argument of forward()"
        )
    model = _copy(model)
    graph = model.graph
    renames = dict(zip(current, input_names, strict=True))
    for value in graph.input:
        value.name = renames[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for value in graph.output:
        if value.name in renames:
            value.name = renames[value.name]
    return model


def _check_dynamic_batch(
    model: onnx.ModelProto, input_names: Sequence[str], dynamic_batch: Sequence[bool], where: str
) -> None:
    """Every dynamic-batch input must have a symbolic leading dim in the exported graph.

    Why: when ``forward`` pins the batch (e.g. ``x + torch.ones(2, 4)``), torch.export fails
    with "You marked batch as dynamic but your code specialized it", and torch.onnx.export then
    silently re-exports with the suggested fix ``batch = 2``. The file looks fine but only
    runs at batch 2, so the fallback is turned back into an error here.
    """
    for value, name, dynamic in zip(model.graph.input, input_names, dynamic_batch, strict=True):
        dim = value.type.tensor_type.shape.dim[0] if dynamic else None
        if dim is not None and not dim.HasField("dim_param"):
            raise EmitError(
                f"{where}: input {name!r} was marked dynamic_batch but the exporter fixed its batch "
                f"to {dim.dim_value} because forward() only works at that size; make forward() "
                "batch-agnostic or set dynamic_batch false for this input"
            )


def _export_failure_message(model_class: str, error: BaseException) -> str:
    """``"model '<class>': ONNX export failed: <root cause first line>; <hint>"``.

    The exporter wraps the real cause (e.g. ``GuardOnDataDependentSymNode: Could not guard on
    data-dependent expression ...``) in a multi-paragraph, ANSI-coloured message, so the
    innermost ``__cause__`` is reported instead.
    """
    root = _root_cause(error)
    first = _first_line(str(root)) or type(root).__name__
    text = f"model {model_class!r}: ONNX export failed: {type(root).__name__}: {first}"
    if "specializ" in str(root) or "Constraints violated" in str(root):
        hint = "the model fixes the batch size; set dynamic_batch false for its inputs"
    elif type(error).__name__ == "TorchExportError" or "data-dependent" in str(root):
        # Not the pt2 hint: pt2 goes through the same torch.export and would fail the same way.
        hint = (
            "torch.export cannot trace forward(); replace data-dependent Python control flow "
            "(e.g. `if x.sum().item() > 0`) with torch.where or torch.cond"
        )
    else:
        hint = _PT2_HINT
    return f"{text}; {hint}"


def _root_cause(error: BaseException) -> BaseException:
    """Follow ``__cause__`` to the innermost exception (cycle-safe)."""
    seen: list[BaseException] = [error]
    while error.__cause__ is not None and error.__cause__ not in seen:
        error = error.__cause__
        seen.append(error)
    return error


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _optimize_qdq(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """int8 weights in the file (not float + QuantizeLinear), int32 biases, int8 global pools (see onnx_quant)."""
    from effopt.optimizer.lower.onnx_qdq import optimize_qdq_model

    try:
        with quiet_third_party():
            return optimize_qdq_model(model)
    except Exception as e:  # graphsurgeon raises OnnxGraphSurgeonException and plain errors
        raise EmitError(f"{where}: optimizing the quantized ONNX graph failed: {_first_line(str(e))}; {_PT2_HINT}") from e


def _dynamic_export_form(module: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[tuple[str, ...]]:
    """While exporting, each `DynamicInput` is its inner QuantLinear; yields the weight names that mark them.

    See `effopt.optimizer.lower.onnx_dynamic.dynamic_export_form`; with ``enabled`` False (no QDQ
    optimization asked for) nothing is swapped and the dynamic layers export as float ops.
    """
    from effopt.optimizer.lower.onnx_dynamic import dynamic_export_form

    return dynamic_export_form(module) if enabled else contextlib.nullcontext(())


def _dynamic_quantize(model: onnx.ModelProto, weights: Sequence[str], where: str) -> onnx.ModelProto:
    """The dynamic layers' MatMul/Gemm as DynamicQuantizeLinear + MatMulInteger (see onnx_dynamic)."""
    from effopt.optimizer.lower.onnx_dynamic import dynamic_quantize_matmuls

    try:
        with quiet_third_party():
            return dynamic_quantize_matmuls(model, weights)
    except Exception as e:  # graphsurgeon raises OnnxGraphSurgeonException and plain errors
        raise EmitError(
            f"{where}: lowering dynamic quantization to onnxruntime's int8 MatMuls failed: {_first_line(str(e))}; "
            f"{_PT2_HINT}"
        ) from e


def _first_line(text: str, limit: int = 300) -> str:
    """First non-blank line without ANSI colour codes, cut to ``limit`` characters."""
    for line in _ANSI_ESCAPE.sub("", text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag.

    Restoring per submodule (not with ``module.train(old)``) keeps mixed states, e.g. a frozen
    BatchNorm inside a training model, exactly as the caller had them.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the exporter and graphsurgeon for one call, restoring everything afterwards.

    - warnings (FutureWarning from pytree, "exporting in training mode"): ``catch_warnings``;
    - torch/onnxscript loggers (torchvision notice): level raised to CRITICAL, then restored;
    - ``print(..., file=sys.stderr)`` of a partial FX graph by torch.export on failure, and
      graphsurgeon's print-based logger: Python-level stdout/stderr go to a discarded buffer.
    Nothing is configured permanently (STYLE rule 19). The buffer swap is process-wide, so
    other threads' prints during an export are lost too.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    sink = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            G_LOGGER.suppress(G_LOGGER.CRITICAL),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --- cleanup, determinism, checks -----------------------------------------------------------


def _clean_graph(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """``fold_constants().cleanup().toposort()`` with onnx-graphsurgeon; returns a new model.

    Folding uses ``error_ok=True`` on purpose: a subgraph onnxruntime cannot evaluate is left
    as computed nodes, which is still a correct model, so it must not fail the emit. Unused
    graph inputs are kept so positional feeding stays stable. E.g. ``x + (k * 2 + 1)`` with
    ``k`` an initializer: the Constant/Cast/Mul/Add chain on ``k`` becomes one initializer.
    """
    try:
        with quiet_third_party():
            graph = gs.import_onnx(model)
            graph.fold_constants(error_ok=True, size_threshold=_FOLD_SIZE_THRESHOLD_BYTES)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            cleaned = gs.export_onnx(graph)
    except Exception as e:  # graphsurgeon raises OnnxGraphSurgeonException and plain errors
        raise EmitError(
            f"{where}: ONNX graph cleanup (onnx-graphsurgeon) failed: {_first_line(str(e))}; {_PT2_HINT}"
        ) from e
    # gs.export_onnx rebuilds the model; keep the exporter's identity fields.
    cleaned.producer_name = model.producer_name
    cleaned.producer_version = model.producer_version
    return cleaned


def _strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without any ``doc_string`` or ``metadata_props``, at every depth.

    The exporter writes ``pkg.torch.onnx.stack_trace`` (absolute paths, line numbers) and FX
    node reprs into ``metadata_props`` of nodes, values and initializers; graphsurgeon drops
    most of them today, but stripping everything here keeps determinism independent of that.
    """
    stripped = _copy(model)
    _strip_message(stripped)
    return stripped


def _compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without what every consumer re-derives, so the shipped file holds weights, not bookkeeping.

    Dropped: attributes equal to their schema default (the exporter spells out
    ``auto_pad="NOTSET"``, ``group=1``, ``alpha=1.0``, ...) and ``value_info`` of
    intermediate tensors (onnxruntime infers shapes itself). On the int8 digits net this is
    ~2 KB of 25 KB, next to 17 KB of int8 weights. Graph inputs/outputs keep their shapes.
    """
    compacted = _copy(model)
    graph = compacted.graph
    opset = next((o.version for o in compacted.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in graph.node:
        _drop_default_attributes(node, opset)
    del graph.value_info[:]
    return compacted


def _drop_default_attributes(node: onnx.NodeProto, opset: int | None) -> None:
    """Remove ``node``'s attributes whose value equals the operator schema's default (in place)."""
    if opset is None or node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return
    keep = []
    for attribute in node.attribute:
        spec = schema.attributes.get(attribute.name)
        default = spec.default_value if spec is not None else None
        is_default = (default is not None and default.type == attribute.type
                      and onnx.helper.get_attribute_value(default) == onnx.helper.get_attribute_value(attribute))
        if not is_default:
            keep.append(attribute)
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _strip_message(message: Message) -> None:
    """Clear ``_DEBUG_FIELDS`` on ``message`` and recurse into every sub-message in place."""
    fields = message.DESCRIPTOR.fields_by_name
    for name in _DEBUG_FIELDS:
        if name in fields:
            message.ClearField(name)
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        # A singular sub-message is a Message; a repeated one is a container of them.
        # (FieldDescriptor.label was removed in protobuf 7, so the value's type decides.)
        for item in [value] if isinstance(value, Message) else value:
            _strip_message(item)


def _serialize(model: onnx.ModelProto, where: str) -> bytes:
    """Deterministic protobuf bytes; a model over protobuf's 2 GiB limit is an EmitError."""
    try:
        return model.SerializeToString(deterministic=True)
    except ValueError as e:
        raise EmitError(
            f"{where}: ONNX model is {model.ByteSize() / 2**30:.2f} GiB, over protobuf's 2 GiB limit "
            f"for a single file; {_PT2_HINT}"
        ) from e


def _check_model(data: bytes, where: str) -> None:
    """``onnx.checker.check_model(full_check=True)``: structure plus strict shape inference."""
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EmitError(f"{where}: exported ONNX fails onnx.checker: {_first_line(str(e))}; {_PT2_HINT}") from e


def _write_atomic(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` via ``<name>.tmp`` and ``os.replace``; return ``path``.

    The temp name appends ``.tmp`` to the full file name (``m.onnx.tmp``), rather than
    replacing the suffix, so emitting ``m.onnx`` and ``m.pt2`` side by side cannot collide.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EmitError(f"{path}: cannot write ONNX file: {e.strerror or e}; check the output directory") from e
    return path


# --- onnxruntime ----------------------------------------------------------------------------


def open_session(path: Path, threads: int = 1, deterministic: bool = True) -> ort.InferenceSession:
    """A CPU session with fixed threads and sequential execution, for repeatable numbers.

    Every onnxruntime session effopt opens (checks, evaluation, benchmarks) comes from here;
    ``deterministic=False`` lets timing runs use onnxruntime's fastest kernels.
    """
    if threads < 1:
        raise EmitError(f"{path}: threads={threads}; onnxruntime needs at least 1 thread")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = deterministic
    options.log_severity_level = 3  # errors only: onnxruntime's warnings go straight to stderr
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        raise EmitError(
            f"{path}: onnxruntime cannot load the model: {_first_line(str(e))}; re-export it with export_onnx"
        ) from e


def _run_session(session: ort.InferenceSession, inputs: Sequence[np.ndarray], path: Path) -> list[np.ndarray]:
    """Feed ``inputs`` by position and return every output as a numpy array."""
    names = [value.name for value in session.get_inputs()]
    if len(inputs) != len(names):
        raise EmitError(f"{path}: model takes {len(names)} inputs {names} but {len(inputs)} were given")
    feed = {name: np.ascontiguousarray(array) for name, array in zip(names, inputs, strict=True)}
    try:
        outputs = session.run(None, feed)
    except Exception as e:  # onnxruntime raises its own pybind types
        shapes = {name: (array.shape, str(array.dtype)) for name, array in feed.items()}
        raise EmitError(
            f"{path}: onnxruntime failed to run the model on inputs {shapes}: {_first_line(str(e))}; "
            "check input shapes and dtypes against the exported example"
        ) from e
    return [np.asarray(output) for output in outputs]


# --- comparison -----------------------------------------------------------------------------


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _flatten_outputs(output: object, where: str) -> list[np.ndarray]:
    """Tensors of a (nested) tuple/list/dict output in order, as numpy; the exporter's order."""
    if isinstance(output, torch.Tensor):
        return [_to_numpy(output)]
    if isinstance(output, (tuple, list)):
        return [array for item in output for array in _flatten_outputs(item, where)]
    if isinstance(output, dict):
        return [array for item in output.values() for array in _flatten_outputs(item, where)]
    raise EmitError(f"{where}: cannot compare an output of type {type(output).__name__}; return tensors")


def _check_output_structure(actual: list[np.ndarray], expected: list[np.ndarray], where: str) -> None:
    """Same number of outputs and same shapes, else the artefact is wrong, not just imprecise."""
    if len(actual) != len(expected):
        raise EmitError(f"{where}: ONNX gives {len(actual)} outputs but torch gives {len(expected)}")
    for i, (got, ref) in enumerate(zip(actual, expected, strict=True)):
        if got.shape != ref.shape:
            raise EmitError(f"{where}: output {i} has shape {got.shape} in ONNX but {ref.shape} in torch")


def _errors(got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> tuple[float, float, bool]:
    """``(max|got - ref|, that / max|ref|, allclose)`` with verification's NaN/inf rules; zeros for empty outputs.

    E.g. got ``[1.0, 2.5]``, ref ``[1.0, 2.0]`` gives ``(0.5, 0.25, ...)``; NaN on both
    sides at the same place is agreement (see `effopt.optimizer.measure.verify.elementwise_errors`).
    """
    if ref.size == 0:
        return 0.0, 0.0, True
    ref_t = torch.from_numpy(ref.astype(np.float64))
    diff, excess = elementwise_errors(torch.from_numpy(got.astype(np.float64)), ref_t, rtol, atol)
    abs_err = float(diff.max())
    scale = float(ref_t.abs().nan_to_num(nan=0.0, posinf=0.0).max())
    return abs_err, abs_err / (scale + 1e-12), bool((excess <= 0).all())
