"""The ``model_aoti.pt2`` artefact: an AOTInductor package, the optimized program compiled to C++ for this CPU.

``torch._inductor.aoti_compile_and_package`` lowers the same ``torch.export`` program as
``model.pt2`` through Inductor (fused C++ loops, oneDNN convs and GEMMs) and packs the
compiled shared library with the weights. It loads without effopt and without a compiler::

    run = torch._inductor.aoti_load_package("model_aoti.pt2")
    y = run(x)                     # same inputs and outputs as model.pt2, any batch it was exported for

Why it is opt-in (``output.formats: [..., aoti]``): compiling calls a C++ compiler and takes
tens of seconds on a small model (the two-block test ResNet: ~45 s on 2 shared cores) to
minutes on ResNet-18, and the package runs only on the ISA it was compiled on. So it is
built only for a CPU target whose ``arch`` is this host's (`aoti_blocker`), and the compile
time is measured and written to ``measurements.json`` (never to report.json, which holds no
measured numbers).

Without a C++ compiler (`cpp_compiler_problem`) asking for it is an `EmitError` (exit 2)
that says how to get one.

Inputs must have the exported layout, `INPUT_LAYOUT`: torch 2.13's compiled code reads each
input with the strides of the example it was exported from and checks nothing. Measured: a
channels-last batch (``x.contiguous(memory_format=torch.channels_last)``) or a transposed view
changed a CIFAR ResNet-18's logits by up to 0.34, and the digits test images, a NumPy reshape
with strides (64, 1, 8, 1) (valid for one channel, and ``x.contiguous()`` keeps them), dropped
the digits net to 11% top-1; ``x.clone(memory_format=torch.contiguous_format)`` fixes both.
Eager PyTorch and ``model.pt2`` take any layout, so the artefact's note says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effopt.errors import EmitError
from effopt.optimizer.emit.quiet import first_line, quiet_third_party
from effopt.optimizer.ir.trace import raise_if_interrupted

__all__ = ["AOTI_FILE", "INPUT_LAYOUT", "AotiPackage", "aoti_blocker", "compile_aoti", "cpp_compiler_problem", "load_aoti"]

AOTI_FILE = "model_aoti.pt2"
INPUT_LAYOUT = ("feed inputs in the contiguous NCHW layout the program was exported with, e.g. "
                "x.clone(memory_format=torch.contiguous_format): the compiled code does not check strides, and a "
                "channels-last or strided input gives wrong outputs silently (torch 2.13)")


@dataclass(frozen=True)
class AotiPackage:
    """A written package and how long Inductor took to build it (seconds, wall clock)."""

    path: Path
    compile_s: float


def cpp_compiler_problem() -> str | None:
    """Why Inductor cannot compile here (no C++ compiler found), or None when it can.

    Inductor looks for ``torch._inductor.config.cpp.cxx`` (``$CXX``, else g++ / clang++ on PATH).
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or an import that fails on a stripped torch build
        raise_if_interrupted(e)
        return (f"AOTInductor needs a C++ compiler and none was found ({type(e).__name__}: "
                f"{first_line(str(e), 160)}); install g++ (apt-get install g++) or set CXX")
    return None


def aoti_blocker(profile: Any, this_host: str | None) -> str | None:
    """Why no AOTInductor package is built for ``profile`` on this host, or None when one is.

    The package holds machine code for the compiling CPU, so the target must be a CPU of this
    host's arch: ``x86-avx2`` on an x86-64 host yes; ``a100`` (a GPU) or ``arm-cortex-a`` there no.
    """
    if profile is None:
        return "no target profile"
    if profile.kind != "cpu" or profile.integer_only:
        return f"target {profile.name} is a {profile.kind}, and the package is compiled for this host's CPU"
    if profile.arch is not None and profile.arch != this_host:
        return (f"target {profile.name} is {profile.arch} and this host is {this_host or 'unknown'}: the package "
                "holds machine code for the CPU that compiles it")
    return None


def compile_aoti(program: torch.export.ExportedProgram, path: Path) -> AotiPackage:
    """Compile ``program`` with AOTInductor into the package ``path``; time it.

    Raises `EmitError` when no C++ compiler is found or Inductor fails (with the first line of
    its error and how to leave the artefact out).
    """
    problem = cpp_compiler_problem()
    if problem is not None:
        raise EmitError(f"output.formats: aoti: {problem}; or remove aoti from output.formats")
    from torch._inductor import aoti_compile_and_package

    started = time.perf_counter()
    try:
        with quiet_third_party():
            written = aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:
        raise_if_interrupted(e)
        raise EmitError(f"AOTInductor could not compile the optimized program: {type(e).__name__}: "
                        f"{first_line(str(e))}; remove aoti from output.formats") from e
    return AotiPackage(Path(written), time.perf_counter() - started)


def load_aoti(path: Path) -> Callable[..., Any]:
    """The package's callable, as a user loads it: ``torch._inductor.aoti_load_package(path)``."""
    from torch._inductor import aoti_load_package

    with quiet_third_party():
        return aoti_load_package(str(path))
