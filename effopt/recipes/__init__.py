"""Recipe schema and loading: the declarative input of `effopt compile`."""

from effopt.recipes.loading import LoadedRecipe, load_recipe, parse_recipe
from effopt.recipes.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "parse_recipe"]
