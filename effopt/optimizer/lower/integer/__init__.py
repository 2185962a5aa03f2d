"""Lower a quantized fx graph to an integer-only program, and run that program bit-exactly.

Int-only targets (``integer_only: true`` profiles such as ``cortex-m7``, i.e. CMSIS-NN / TFLite
Micro) keep every tensor as int8 codes and every accumulator as int32. Pipeline::

    fx graph that follows the quantized-graph contract (effopt.optimizer.quant.contract)
        │ lower_to_integer(gm, example_inputs)          lowering.py: every integer parameter, or a
        ▼                                               LoweringError naming each float node
    IntegerProgram  (IntQuantizeInput → IntConv/IntAdd/... → IntDequantizeOutput)   program.py
        │                                               (PReLU / softmax parameters: activations.py)
        ├─ IntegerExecutor(program).run(int8 arrays)   executor.py: NumPy integer arithmetic only
        ├─ reference_integer_model(program)            reference.py: the same arithmetic in torch
        └─ effopt.optimizer.emit.c_header.write_c_header    weights + qparams for firmware

The fixed-point arithmetic both runners share is `fixed_point` (gemmlowp / TFLite routines).
Everything public is importable from here:
``from effopt.optimizer.lower.integer import lower_to_integer, IntegerExecutor``.
"""

from effopt.optimizer.lower.integer.executor import IntegerExecutor, integer_accuracy
from effopt.optimizer.lower.integer.fixed_point import (
    ADD_LEFT_SHIFT,
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    INT32_MIN,
    headroom_shift,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from effopt.optimizer.lower.integer.lowering import lower_to_integer
from effopt.optimizer.lower.integer.program import (
    IntAdd,
    IntAvgPool,
    IntCat,
    IntClamp,
    IntConv,
    IntDequantizeOutput,
    IntegerProgram,
    IntLinear,
    IntMatMul,
    IntMaxPool,
    IntMean,
    IntMul,
    IntOp,
    IntPReLU,
    IntQuantizeInput,
    IntRequantize,
    IntReshape,
    IntSlice,
    IntSoftmax,
    IntTranspose,
    Pads,
    QParams,
    TensorInfo,
)
from effopt.optimizer.lower.integer.reference import reference_integer_model

__all__ = [
    "ADD_LEFT_SHIFT",
    "INT8_MAX",
    "INT8_MIN",
    "INT32_MAX",
    "INT32_MIN",
    "IntAdd",
    "IntAvgPool",
    "IntCat",
    "IntClamp",
    "IntConv",
    "IntDequantizeOutput",
    "IntLinear",
    "IntMatMul",
    "IntMaxPool",
    "IntMean",
    "IntMul",
    "IntOp",
    "IntPReLU",
    "IntQuantizeInput",
    "IntRequantize",
    "IntReshape",
    "IntSlice",
    "IntSoftmax",
    "IntTranspose",
    "IntegerExecutor",
    "IntegerProgram",
    "Pads",
    "QParams",
    "TensorInfo",
    "headroom_shift",
    "integer_accuracy",
    "lower_to_integer",
    "multiply_by_quantized_multiplier",
    "quantize_multiplier",
    "reference_integer_model",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
]
