"""An `IntegerProgram`'s weights and quantization parameters as one self-contained C header for firmware.

The header holds data only: the firmware's kernels (CMSIS-NN, TFLite Micro, or
hand-written loops) read it. For every layer, in program order:

- int8 ``<model>_<layer>_weights[]`` (row-major, the shape as ``..._WEIGHTS_DIM_i``
  defines), int32 ``..._bias[]``, per-channel int32 ``..._multiplier[]`` and
  ``..._shift[]`` (TFLite convention: M = multiplier·2^−31·2^shift, shift > 0
  is a left shift);
- every scalar parameter (zero points, clamp range, stride, padding, groups,
  per-input multipliers of add/cat, ...) as ``#define <MODEL>_<LAYER>_<FIELD>``;
- each tensor's per-sample element count (``<MODEL>_<TENSOR>_SIZE``) for arena planning.

The model inputs' scale and zero point are ``#define``d too: the sensor pipeline
quantizes with them (q = clamp(round(x/scale) + zero_point, qmin, qmax)); the
outputs' scales are there for reporting. No integer layer reads a float.

The text is deterministic (program order, fixed number formatting), so the
same program always gives byte-identical headers. Example::

    /* layer 0 'conv1' (conv): x_quant -> relu_quant */
    #define DIGITS_CONV1_INPUT_ZERO (-128)
    static const int8_t digits_conv1_weights[144] = {
        12, -7, 127, ...
    };
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np

from effopt.errors import EmitError
from effopt.optimizer.lower.integer import INT32_MIN, IntegerProgram, QParams

_LINE_WIDTH = 100
_C_TYPES = {np.dtype(np.int8): "int8_t", np.dtype(np.int32): "int32_t"}
_ARRAY_NAMES = {"weight": "weights"}
_SKIP_FIELDS = {"name", "input", "output", "inputs"}
# How the kernel of a layer kind that the header's opening comment does not cover reads its fields.
_FORMULAS = {
    "prelu": ["acc = (x - INPUT_ZERO) << LEFT_SHIFT; y = MBQM(acc, POS_MULTIPLIER, POS_SHIFT) where x >= INPUT_ZERO,",
              "else MBQM(acc, neg_multiplier[c], neg_shift[c]) (a negative multiplier m: MBQM(-acc, -m, shift));",
              "y = clamp(y + OUTPUT_ZERO, ACT_MIN, ACT_MAX); c is the channel (axis 1; one entry: shared)"],
    "softmax": ["along AXIS: e = exp_table[max(x) - x] (2^TABLE_BITS * exp(-s_in * d)); sum = sum(e) (int32);",
                "y = clamp((2 * INV_SCALE * e + sum) / (2 * sum) + OUTPUT_ZERO, ACT_MIN, ACT_MAX)"],
}


def c_identifier(text: str) -> str:
    """``text`` as a C identifier: non-alphanumerics become ``_``, a leading digit gets a ``_`` prefix.

    >>> c_identifier("layer1.0-conv")
    'layer1_0_conv'
    """
    ident = re.sub(r"\W", "_", text, flags=re.ASCII)
    return f"_{ident}" if not ident or ident[0].isdigit() else ident


def _comment(text: str) -> str:
    """``text`` safe inside a C block comment."""
    return text.replace("*/", "* /").replace("/*", "/ *")


def _unique(names: Iterable[str]) -> list[str]:
    """Sanitised names, made unique in order by a numeric suffix (``conv.1`` and ``conv_1`` would collide)."""
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = c_identifier(name).lower()
        candidate, i = base, 0
        while candidate in taken:
            i += 1
            candidate = f"{base}_{i}"
        taken.add(candidate)
        out.append(candidate)
    return out


def _int_literal(v: int) -> str:
    v = int(v)
    if v == INT32_MIN:
        return "(-2147483647 - 1)"
    return f"({v})" if v < 0 else str(v)


def _array_literal(v: int) -> str:
    v = int(v)
    return "(-2147483647 - 1)" if v == INT32_MIN else str(v)


def _float_literal(v: float) -> str:
    return f"{v:.9e}f"


def _wrap(items: list[str], indent: str = "    ") -> list[str]:
    lines, line = [], indent
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + len(piece) + 1 > _LINE_WIDTH and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += piece + " "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _array(c_name: str, a: np.ndarray) -> list[str]:
    ctype = _C_TYPES.get(a.dtype)
    if ctype is None:
        raise EmitError(f"C header: array {c_name} has dtype {a.dtype}; only int8 and int32 are emitted")
    flat = a.reshape(-1)
    if flat.size == 0:
        raise EmitError(f"C header: array {c_name} is empty (C has no zero-length arrays)")
    values = [_array_literal(v) for v in flat.tolist()]
    return [f"static const {ctype} {c_name}[{flat.size}] = {{", *_wrap(values), "};"]


def _defines(macro: str, value: object) -> list[str]:
    """``#define`` lines for an int, a bool or a (nested) tuple of ints."""
    if isinstance(value, bool):
        return [f"#define {macro} {int(value)}"]
    if isinstance(value, (int, np.integer)):
        return [f"#define {macro} {_int_literal(int(value))}"]
    if isinstance(value, tuple):
        lines = []
        for i, v in enumerate(value):
            if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
                lines += _defines(f"{macro}_{i}_BEFORE", v[0]) + _defines(f"{macro}_{i}_AFTER", v[1])
            else:
                lines += _defines(f"{macro}_{i}", v)
        return lines
    raise EmitError(f"C header: {macro} has a value of type {type(value).__name__} that C cannot hold")


def _qparams_lines(macro: str, qp: QParams) -> list[str]:
    return [
        f"#define {macro}_SCALE {_float_literal(qp.scale)}",
        f"#define {macro}_ZERO_POINT {_int_literal(qp.zero_point)}",
        f"#define {macro}_QMIN {_int_literal(qp.qmin)}",
        f"#define {macro}_QMAX {_int_literal(qp.qmax)}",
    ]


def write_c_header(program: IntegerProgram, name: str) -> str:
    """The C99 header text (include guard, ``<stdint.h>``) of ``program``'s parameters, prefixed by ``name``."""
    prefix = c_identifier(name).lower()
    upper = prefix.upper()
    layer_ids = _unique(op.name for op in program.ops)
    tensor_ids = _unique(t.name for t in program.tensors)
    guard = f"EFFOPT_{upper}_H"

    out = [
        f"/* {prefix}.h: integer-only model generated by effopt (effopt.optimizer.emit.c_header)",
        f" * from '{_comment(name)}'.",
        " *",
        " * Every tensor is int8, every accumulator int32. A layer's output is",
        " *   y = clamp(MBQM(acc << left_shift, multiplier, shift) + output_zero, act_min, act_max)",
        " * with MBQM TFLite's MultiplyByQuantizedMultiplier (multiplier in [2^30, 2^31), shift > 0 is a",
        " * left shift) and left_shift 0 where a layer has none (add: per input, see IntAdd).",
        " * Conv/linear accumulate acc = bias + sum((x - input_zero) * w); padding holds input_zero (real 0).",
        " * Weights are row-major [C_out][C_in/groups][kernel...] (linear: [out][in]); activations NCHW.",
        f" * Worst-case accumulator: {program.accumulator_bits} bits.",
        " *",
        " * Layers, in execution order:",
        *[f" *   {i:>3} {lid} ({op.kind}): {', '.join(_op_inputs(op))} -> {op.output}"
          for i, (lid, op) in enumerate(zip(layer_ids, program.ops))],
        " */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stdint.h>",
        "",
        f"#define {upper}_NUM_LAYERS {len(program.ops)}",
        f"#define {upper}_NUM_INPUTS {len(program.inputs)}",
        f"#define {upper}_NUM_OUTPUTS {len(program.outputs)}",
        f"#define {upper}_ACCUMULATOR_BITS {program.accumulator_bits}",
        "",
    ]
    for i, q in enumerate(program.inputs):
        t = program.tensor(q.output)
        out.append(f"/* input {i} '{q.name}' -> tensor '{q.output}' {list(t.shape)}, quantized by the sensor")
        out.append("   pipeline: q = clamp(round(x / SCALE) + ZERO_POINT, QMIN, QMAX) */")
        out += _qparams_lines(f"{upper}_INPUT{i}", q.qparams)
        out += _defines(f"{upper}_INPUT{i}_SHAPE", t.shape)
        out.append("")
    for i, o in enumerate(program.outputs):
        t = program.tensor(o.input)
        out.append(f"/* output {i} '{o.name}' <- tensor '{o.input}' {list(t.shape)}: "
                   "real = (q - ZERO_POINT) * SCALE */")
        out += _qparams_lines(f"{upper}_OUTPUT{i}", o.qparams)
        out += _defines(f"{upper}_OUTPUT{i}_SHAPE", t.shape)
        out.append("")
    out.append("/* per-sample element count of every tensor (for the tensor arena) */")
    for tid, t in zip(tensor_ids, program.tensors):
        size = 1
        for d in t.shape:
            size *= d
        out.append(f"#define {upper}_{tid.upper()}_SIZE {size}")
    out.append("")
    for i, (lid, op) in enumerate(zip(layer_ids, program.ops)):
        out.append(f"/* layer {i} '{op.name}' ({op.kind}): {', '.join(_op_inputs(op))} -> {op.output} */")
        out += [f"/*   {line} */" for line in _FORMULAS.get(op.kind, [])]
        macro = f"{upper}_{lid.upper()}"
        arrays: list[str] = []
        for f in dataclasses.fields(op):
            if f.name in _SKIP_FIELDS:
                continue
            value = getattr(op, f.name)
            field_id = _ARRAY_NAMES.get(f.name, f.name)
            if isinstance(value, np.ndarray):
                if value.ndim > 1:
                    out += _defines(f"{macro}_{field_id.upper()}_DIM", tuple(int(d) for d in value.shape))
                arrays += _array(f"{prefix}_{lid}_{field_id}", value)
            else:
                out += _defines(f"{macro}_{field_id.upper()}", value)
        out += arrays
        out.append("")
    out += [f"#endif /* {guard} */", ""]
    return "\n".join(out)


def _op_inputs(op: object) -> tuple[str, ...]:
    inputs = getattr(op, "inputs", None)
    return tuple(inputs) if inputs is not None else (getattr(op, "input"),)
