"""Keeping third-party chatter out of effopt's output: silence it while it runs, cut its errors to one line.

Why: the exporters (torch.onnx, torch.export), onnx-graphsurgeon and onnxruntime print,
log and warn on their own (the torchvision notice, FutureWarnings, a partial FX graph on
stderr when ``torch.export`` fails), and their error messages run to many ANSI-coloured
paragraphs. Library code must stay quiet (STYLE rule 19) and messages must fit on a line
(rule 18), so emitters, measurement and the benchmarks wrap those calls with these two.

Example::

    with quiet_third_party():
        program = torch.export.export(model, args)   # nothing printed, warnings dropped
    first_line("\\x1b[31mError:\\x1b[0m bad shape\\n  at ...")   # 'Error: bad shape'
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator

from onnx_graphsurgeon.logger import G_LOGGER

__all__ = ["first_line", "quiet_third_party"]

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

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


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


def first_line(text: str, limit: int = 300) -> str:
    """First non-blank line without ANSI colour codes, cut to ``limit`` characters.

    Example: ``first_line("\\n  \\x1b[1mKeyError\\x1b[0m: 'x'\\nTraceback ...")`` is ``"KeyError: 'x'"``;
    a 400-character line comes back as its first 297 characters and ``...``.
    """
    for line in _ANSI_ESCAPE.sub("", text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""
