"""Window geometry of convs and pools: kernel, stride, explicit (before, after) padding and dilation.

Torch describes a window op by its module's or call's arguments (``padding=1``, ``ceil_mode``,
adaptive output sizes); the integer program wants explicit numbers that reproduce torch's output
size exactly. Pure shape arithmetic, checked against the output shape the IR recorded. Example:
a 3×3 max pool, stride 2, padding 1 on 8×8 with ``ceil_mode=True`` gives 5×5 outputs, which needs
padding (1, 2) per axis: ``pool_window("p", "max_pool", param, (8, 8), (5, 5)).padding``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from effopt.errors import LoweringError
from effopt.optimizer.lower.integer.program import Pads

__all__ = ["Window", "as_tuple", "conv_window", "pool_window"]


@dataclass(frozen=True)
class Window:
    """Per spatial axis: kernel size, stride, (before, after) padding and dilation."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]


def as_tuple(v: Any, n: int) -> tuple[int, ...]:
    """``v`` (an int, or a sequence of one or ``n`` ints) as ``n`` ints: ``as_tuple(3, 2) == (3, 3)``."""
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))


def conv_window(name: str, conv: nn.modules.conv._ConvNd, kernel: tuple[int, ...], in_sp: tuple[int, ...],
                out_sp: tuple[int, ...]) -> Window:
    """The window of a zero-padded conv; raises `LoweringError` if it does not give ``out_sp``."""
    nd = len(kernel)
    rev = conv._reversed_padding_repeated_twice
    pads = tuple((int(rev[2 * (nd - 1 - i)]), int(rev[2 * (nd - 1 - i) + 1])) for i in range(nd))
    stride, dilation = as_tuple(conv.stride, nd), as_tuple(conv.dilation, nd)
    got = tuple((i + lo + hi - d * (k - 1) - 1) // s + 1
                for i, (lo, hi), d, k, s in zip(in_sp, pads, dilation, kernel, stride))
    if got != out_sp:
        raise LoweringError(f"node '{name}': conv output {out_sp} does not match its parameters ({got})")
    return Window(kernel, stride, pads, dilation)


def pool_window(name: str, kind: str, param: Callable[[str, int, Any], Any], in_sp: tuple[int, ...],
                out_sp: tuple[int, ...]) -> Window | str:
    """The window of a max/avg (or adaptive) pool, or why it cannot lower.

    ``param(attr, position, default)`` reads an argument of the pool (the module's attribute or
    the call's argument). Adaptive pools lower only when the output size divides the input
    (equal windows). Raises `LoweringError` if no padding reproduces ``out_sp``.
    """
    nd = len(in_sp)
    if kind.startswith("adaptive"):
        if any(i % o for i, o in zip(in_sp, out_sp)):
            return f"has output size {out_sp} that does not divide the input {in_sp}: windows differ in size"
        kernel = tuple(i // o for i, o in zip(in_sp, out_sp))
        lo, stride, dilation = (0,) * nd, kernel, (1,) * nd
    else:
        kernel = as_tuple(param("kernel_size", 1, None), nd)
        stride_v = param("stride", 2, None)
        stride = kernel if stride_v in (None, (), []) else as_tuple(stride_v, nd)
        lo = as_tuple(param("padding", 3, 0), nd)
        dilation = as_tuple(param("dilation", 4, 1), nd) if kind == "max_pool" else (1,) * nd
        if kind == "max_pool" and param("return_indices", 6, False):
            return "returns indices: only the pooled values lower"
    pads = []
    for i, o, k, s, p, d in zip(in_sp, out_sp, kernel, stride, lo, dilation):
        after = max((o - 1) * s + d * (k - 1) + 1 - i - p, 0)  # ceil_mode may need more padding after
        if (i + p + after - d * (k - 1) - 1) // s + 1 != o:
            raise LoweringError(f"node '{name}': pool output {out_sp} does not match its parameters")
        pads.append((p, after))
    return Window(kernel, stride, tuple(pads), dilation)
