"""effopt: a declarative, compiler-style optimizer for trained PyTorch models.

    import effopt
    result = effopt.compile("recipes/digits.yaml", output_dir="out/digits")
    result.passed, result.report.after.flops, result.model  # the optimized GraphModule
"""

from effopt.errors import (
    DataError,
    EffoptError,
    EmitError,
    InternalError,
    IRError,
    LoweringError,
    PassError,
    ProfileError,
    RecipeError,
    TraceError,
    VerificationError,
)
from effopt.optimizer.compiler import Result, compile, prepare
from effopt.recipes import Recipe, load_recipe

__all__ = [
    "DataError", "EffoptError", "EmitError", "IRError", "InternalError", "LoweringError", "PassError", "ProfileError",
    "Recipe", "RecipeError", "Result", "TraceError", "VerificationError", "compile", "load_recipe", "prepare",
]
