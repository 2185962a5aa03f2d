"""Load and validate a recipe file; every error names the file, the line, the field path and the fix.

``digits.yaml:14: passes[1].sparsity: Input should be less than 1 (got 1.3)``
is the shape of every message: pydantic's errors are re-rendered with the YAML
line of the offending key, never shown as a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from effopt.errors import PassError, RecipeError
from effopt.passes.base import Pass
from effopt.recipes.schema import Recipe


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe, where it came from, and its passes built from their options."""

    recipe: Recipe
    path: Path | None
    passes: tuple[Pass, ...]

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return self.path.parent if self.path is not None else Path.cwd()

    @property
    def label(self) -> str:
        return self.path.name if self.path is not None else "<recipe>"

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base_dir / p))


def format_loc(loc: tuple[Any, ...]) -> str:
    """('passes', 2, 'options', 'sparsity') → 'passes[2].sparsity' (the 'options' level is implicit in YAML)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("options",) or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based YAML line of the deepest key along ``loc`` that exists in the file."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                continue  # e.g. the implicit 'options' level
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _render(e: ValidationError, label: str, tree: yaml.Node | None, prefix: tuple[Any, ...] = ()) -> str:
    lines = []
    errors = e.errors()
    for err in errors:
        loc = prefix + tuple(err["loc"])
        if err["type"] == "too_short" and any(len(o["loc"]) > len(err["loc"]) and o["loc"][: len(err["loc"])] == err["loc"] for o in errors):
            continue  # a consequence of an item's own error, reported on its own line
        line = _line_of(tree, loc)
        where = f"{label}:{line}" if line else label
        got = err.get("input")
        quiet = err["type"] in ("missing", "value_error") or isinstance(got, dict)
        got_s = "" if quiet else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        lines.append(f"{where}: {format_loc(loc)}: {msg}{got_s}")
    return "\n".join(lines)


def _fields_hint(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "(none)"


def resolve_passes(recipe: Recipe, label: str = "<recipe>", tree: yaml.Node | None = None) -> tuple[Pass, ...]:
    """Build each pass from its options, or raise `RecipeError` naming the pass and the valid choices."""
    from effopt.passes import get_pass  # local: the registry imports every pass module

    built: list[Pass] = []
    for i, spec in enumerate(recipe.passes):
        if spec.name == "auto":
            if spec.options:
                raise RecipeError(f"{label}: passes[{i}]: 'auto' takes no options; put goals under goal:")
            continue
        line = _line_of(tree, ("passes", i))
        where = f"{label}:{line}" if line else label
        try:
            cls = get_pass(spec.name)
        except PassError as e:
            raise RecipeError(f"{where}: passes[{i}]: {e}") from e
        try:
            options = cls.Options.model_validate(spec.options)
        except ValidationError as e:
            raise RecipeError(
                _render(e, label, tree, ("passes", i, "options"))
                + f"\n  options of '{cls.name}': {_fields_hint(cls.Options)} (see `effopt passes`)"
            ) from e
        built.append(cls(options))
    from effopt.passes.manager import check_order

    try:
        check_order(built)
    except PassError as e:
        raise RecipeError(f"{label}: {e}") from e
    return tuple(built)


def parse_recipe(data: Any, label: str = "<recipe>", tree: yaml.Node | None = None, path: Path | None = None) -> LoadedRecipe:
    """Validate already-parsed recipe data (a dict, or a `Recipe`)."""
    if isinstance(data, Recipe):
        recipe = data
    else:
        if not isinstance(data, dict):
            raise RecipeError(f"{label}: a recipe is a YAML mapping with keys version, model, inputs, ...; got {type(data).__name__}")
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            raise RecipeError(_render(e, label, tree)) from e
    return LoadedRecipe(recipe, path, resolve_passes(recipe, label, tree))


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, parse and validate the recipe at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark is not None else path.name
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    return parse_recipe(data, path.name, tree, path.resolve())
