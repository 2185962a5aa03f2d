"""effopt: a declarative, compiler-style optimizer for trained PyTorch models.

    import effopt
    result = effopt.compile("recipes/digits.yaml", output_dir="out/digits")
    result.passed, result.report.after.flops, result.model  # the optimized GraphModule
"""

from effopt.errors import EffoptError
from effopt.optimizer.compiler import Result, compile, prepare
from effopt.recipes import Recipe, load_recipe

__all__ = ["EffoptError", "Recipe", "Result", "compile", "load_recipe", "prepare"]
