"""effopt's exception hierarchy.

Callers catch errors by type; the CLI maps them to exit codes in one place
(`effopt.cli.exit_code_for`): 2 for bad input of any kind, 1 for a model that
fails verification. Every message says where (file, field, node), what went
wrong, and what to do about it.

Anything that is not an `EffoptError` is a bug in effopt: the CLI prints its
traceback and exits 3. So a pass that crashes with, say, a ``KeyError`` is
re-raised as `InternalError` (naming the pass), never as `PassError`:

    >>> issubclass(InternalError, EffoptError)
    False
"""

from __future__ import annotations


class EffoptError(Exception):
    """Root of every error effopt raises on purpose."""

    exit_code: int = 2


class RecipeError(EffoptError):
    """The recipe file is missing, malformed, or names something that does not exist."""


class ProfileError(EffoptError):
    """A hardware profile is missing or invalid."""


class DataError(EffoptError):
    """A data source named by the recipe cannot be loaded or does not match `inputs`."""


class TraceError(EffoptError):
    """torch.fx could not trace the model, or shape propagation failed."""


class FxTraceError(TraceError):
    """torch.fx could not trace the model; the parts are kept for a caller that tries torch.export next.

    ``FxTraceError("the top-level module (Net)", "net.py:42", "TraceError: symbolically traced variables ...",
    "make the forward free of data-dependent Python control flow")`` reads
    ``torch.fx cannot trace the top-level module (Net) at net.py:42: TraceError: ... Fix: make the forward ...``.
    """

    def __init__(self, where: str, line: str | None, error: str, hint: str) -> None:
        self.where, self.line, self.error, self.hint = where, line, error, hint
        super().__init__(f"{self.reason()}. Fix: {hint}")

    def reason(self, line: str | None = None) -> str:
        """What failed and where, without the fix; ``line`` overrides the 'file:line' (e.g. a file name only)."""
        at = line if line is not None else self.line
        return f"torch.fx cannot trace {self.where}{f' at {at}' if at else ''}: {self.error}"


class IRError(EffoptError):
    """The IR is not in the state an operation needs (e.g. facts not annotated)."""


class PassError(EffoptError):
    """A pass failed, was misconfigured, or the pass order is invalid."""


class LoweringError(PassError):
    """The quantized graph cannot be lowered to a target's integer program (a float op, a scale out of range).

    Raised by the integer lowering; `compile` turns it into a failed "runs on the
    target" goal (exit 1) rather than aborting. A `PassError` subclass so code that
    caught the lowering's errors as `PassError` before it had its own class still does.
    """


class EmitError(EffoptError):
    """An artefact (pt2, ONNX, report) could not be produced or does not check out."""


class VerificationError(EffoptError):
    """The optimized model disagrees with the original beyond the recipe's tolerance."""

    exit_code = 1


class InternalError(Exception):
    """A bug in effopt (not bad input): the CLI prints the traceback and exits 3.

    Deliberately not an `EffoptError`, so no handler for bad input swallows it.
    The message names the step that crashed, e.g. ``pass 'quantize' crashed
    (after fold_batchnorm): KeyError: 'conv1'``; ``__cause__`` is the original error.
    """
