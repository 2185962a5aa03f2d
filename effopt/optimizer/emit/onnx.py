"""Emit a torch model as a clean, checked, byte-deterministic ONNX file.

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
  ``torch.export`` fails), while library code must stay quiet (STYLE rule 19), so it runs
  inside `effopt.optimizer.emit.quiet.quiet_third_party`.

Running the file and comparing it with torch is measurement, not emission: see
`effopt.optimizer.measure.runtime` (sessions) and `effopt.optimizer.measure.verify.compare_onnx`.

Pipeline, each step a small function::

    torch module --_torch_to_onnx--> ModelProto --_clean_graph--> --_strip_debug_info-->
        --_serialize + _check_model--> bytes --_write_atomic--> path

Example::

    path = export_onnx(model, (torch.randn(1, 3, 32, 32),), ["image"], [True], Path("m.onnx"))
    onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param   # 'batch'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from effopt.errors import EmitError
from effopt.optimizer.emit.quiet import first_line, quiet_third_party
from effopt.optimizer.ir.trace import raise_if_interrupted

__all__ = ["export_onnx", "half_onnx_blocker"]

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

_PT2_HINT = "pass formats: [pt2] to skip ONNX"


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
        with eval_mode_as_exported(module), quiet_third_party():
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
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
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
    first = first_line(str(root)) or type(root).__name__
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
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
        raise EmitError(f"{where}: optimizing the quantized ONNX graph failed: {first_line(str(e))}; {_PT2_HINT}") from e


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
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
        raise EmitError(
            f"{where}: lowering dynamic quantization to onnxruntime's int8 MatMuls failed: {first_line(str(e))}; "
            f"{_PT2_HINT}"
        ) from e


@contextlib.contextmanager
def eval_mode_as_exported(module: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag.

    ``module.eval()`` rather than setting flags: a `FakeQuant` syncs its learned scale on
    ``train(False)``, so the check in `effopt.optimizer.measure.verify` runs the model exactly
    as the export saw it.

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
        raise_if_interrupted(e)  # a Ctrl-C inside the library stays an interrupt
        raise EmitError(
            f"{where}: ONNX graph cleanup (onnx-graphsurgeon) failed: {first_line(str(e))}; {_PT2_HINT}"
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
        raise EmitError(f"{where}: exported ONNX fails onnx.checker: {first_line(str(e))}; {_PT2_HINT}") from e


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


# --- half precision: does onnxruntime run it? ------------------------------------------------

_ORT_TYPE = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}


def half_onnx_blocker(dtype: str, op_types: Sequence[str]) -> str | None:
    """Why a ``dtype`` (fp16/bf16) ONNX would not run in ``dtype`` on onnxruntime's CPU provider, or None.

    The question is the kernel registry, not whether a session loads: for a float16 node
    without a float16 kernel onnxruntime inserts Cast-to-float32 around it and runs it in
    float32, so an fp16 file would run fp32 math plus casts. E.g. onnxruntime 1.32 on x86-64
    registers Conv and Gemm for ``tensor(float)`` only, so ``half_onnx_blocker("fp16",
    ["Conv", "Gemm"])`` names both and the ONNX artefact stays fp32.
    """
    try:
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state

        kernels = _pybind_state.get_all_opkernel_def()
    except Exception as e:  # a build without the registry query: assume no half kernels, and say why
        raise_if_interrupted(e)
        return f"onnxruntime's kernel registry could not be read ({type(e).__name__}), so no {dtype} kernel is assumed"
    wanted = _ORT_TYPE[dtype]
    have = {k.op_name for k in kernels if k.provider == "CPUExecutionProvider" and k.domain in ("", "ai.onnx")
            and any(wanted in types for types in k.type_constraints.values())}
    missing = sorted(set(op_types) - have)
    if not missing:
        return None
    return (f"onnxruntime {ort.__version__}'s CPU execution provider has no {wanted} kernel for "
            f"{', '.join(missing)} (it would cast to float32 around them)")
