"""effopt's exception hierarchy.

Callers catch errors by type; the CLI maps them to exit codes in one place
(`effopt.cli.exit_code_for`): 2 for bad input of any kind, 1 for a model that
fails verification. Every message says where (file, field, node), what went
wrong, and what to do about it.
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


class IRError(EffoptError):
    """The IR is not in the state an operation needs (e.g. facts not annotated)."""


class PassError(EffoptError):
    """A pass failed, was misconfigured, or the pass order is invalid."""


class EmitError(EffoptError):
    """An artefact (pt2, ONNX, report) could not be produced or does not check out."""


class VerificationError(EffoptError):
    """The optimized model disagrees with the original beyond the recipe's tolerance."""

    exit_code = 1
