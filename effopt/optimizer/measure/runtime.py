"""onnxruntime sessions: every one effopt opens (checks, evaluation, benchmarks) comes from here.

Why one place: a session's numbers depend on its options (threads, execution order,
deterministic kernels), so checks and scores are only repeatable if every caller opens
sessions the same way; and onnxruntime's errors (its own pybind types, multi-line,
sometimes ANSI-coloured) become one `EmitError` that names the file and what to do.

Example::

    (logits,) = run_onnx(Path("m.onnx"), [np.zeros((5, 3, 32, 32), np.float32)])  # graph order
    run = onnx_runner(Path("m.onnx"))            # torch in, tuple of torch tensors out
    run(torch.zeros(5, 3, 32, 32))[0].shape      # torch.Size([5, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from effopt.errors import EmitError
from effopt.optimizer.emit.quiet import first_line

__all__ = ["flatten_outputs", "onnx_runner", "open_session", "run_onnx", "run_session", "to_numpy"]


def open_session(path: Path, threads: int = 1, deterministic: bool = True,
                 optimized_model_path: Path | None = None, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session with fixed threads and sequential execution, for repeatable numbers.

    ``deterministic=False`` lets timing runs use onnxruntime's fastest kernels.
    ``optimized_model_path`` makes onnxruntime save the graph it actually runs (after its
    fusions) there, e.g. to count which ops ended up in int8. ``optimize=False`` turns every
    graph optimization off, so a Q/DQ model runs as written (DequantizeLinear → float op →
    QuantizeLinear): the file's meaning, free of this machine's int8 kernels' limits.

    Raises:
        EmitError: ``threads < 1``, or onnxruntime cannot load the file.
    """
    if threads < 1:
        raise EmitError(f"{path}: threads={threads}; onnxruntime needs at least 1 thread")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = deterministic
    options.log_severity_level = 3  # errors only: onnxruntime's warnings go straight to stderr
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        raise EmitError(
            f"{path}: onnxruntime cannot load the model: {first_line(str(e))}; re-export it with export_onnx"
        ) from e


def run_session(session: ort.InferenceSession, inputs: Sequence[np.ndarray], path: Path) -> list[np.ndarray]:
    """Feed ``inputs`` by position (graph input order) and return every output as a numpy array.

    Raises:
        EmitError: a wrong number of inputs, or onnxruntime fails on them (the message lists
            the shapes and dtypes fed).
    """
    names = [value.name for value in session.get_inputs()]
    if len(inputs) != len(names):
        raise EmitError(f"{path}: model takes {len(names)} inputs {names} but {len(inputs)} were given")
    feed = {name: np.ascontiguousarray(array) for name, array in zip(names, inputs, strict=True)}
    try:
        outputs = session.run(None, feed)
    except Exception as e:  # onnxruntime raises its own pybind types
        shapes = {name: (array.shape, str(array.dtype)) for name, array in feed.items()}
        raise EmitError(
            f"{path}: onnxruntime failed to run the model on inputs {shapes}: {first_line(str(e))}; "
            "check input shapes and dtypes against the exported example"
        ) from e
    return [np.asarray(output) for output in outputs]


def run_onnx(path: Path, inputs: Sequence[np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """Run the ONNX file at ``path`` on CPU and return its outputs in graph order.

    Inputs are fed by position (graph input order). The session uses ``threads`` intra-op
    threads, one inter-op thread and sequential execution, so repeated runs on one machine
    give identical results, which verification and benchmarks rely on.

    Raises:
        EmitError: onnxruntime cannot load the file or run it on these inputs.
    """
    return run_session(open_session(path, threads), inputs, path)


def onnx_runner(path: Path, threads: int = 1, optimize: bool = True) -> Callable[..., tuple[torch.Tensor, ...]]:
    """One session on ``path`` as a function from torch inputs to the tuple of torch outputs.

    ``optimize`` as in `open_session`.

    Raises:
        EmitError: onnxruntime cannot load the file (now) or run it on the inputs (when called).
    """
    session = open_session(path, threads, optimize=optimize)

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = run_session(session, [to_numpy(t) for t in inputs], path)
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs)

    return run


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a numpy array on the CPU (a view where torch allows one)."""
    return tensor.detach().cpu().numpy()


def flatten_outputs(output: object, where: str) -> list[np.ndarray]:
    """Tensors of a (nested) tuple/list/dict torch output in order, as numpy: the ONNX exporter's order.

    Example: ``flatten_outputs((h, {"s": s}), "m")`` is ``[h.numpy(), s.numpy()]``, matching
    the two graph outputs of the exported file.

    Raises:
        EmitError: a leaf is not a tensor (an ONNX graph cannot return it).
    """
    if isinstance(output, torch.Tensor):
        return [to_numpy(output)]
    if isinstance(output, (tuple, list)):
        return [array for item in output for array in flatten_outputs(item, where)]
    if isinstance(output, dict):
        return [array for item in output.values() for array in flatten_outputs(item, where)]
    raise EmitError(f"{where}: cannot compare an output of type {type(output).__name__}; return tensors")

