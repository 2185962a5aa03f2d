"""Turn a recipe's ``model:`` section into an eval-mode nn.Module or GraphModule.

Import folders (the recipe's own folder and ``model.pythonpath``) are put on
``sys.path`` only for the duration of the import, so loading one recipe does
not change how the next one resolves.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from effopt.errors import RecipeError
from effopt.optimizer.frontend.files import load_torch_file
from effopt.optimizer.ir.trace import raise_if_interrupted, user_line
from effopt.recipes.loading import LoadedRecipe


@contextlib.contextmanager
def import_paths(paths: Sequence[Path]) -> Iterator[None]:
    """Temporarily prepend ``paths`` to sys.path."""
    added = [str(p) for p in paths if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)


def _forget_shadowed(top: str, roots: Sequence[Path]) -> None:
    """Drop a cached module ``top`` (and its submodules) if ``roots`` hold a different one of that name.

    Two recipes in different folders may each ship a ``net.py``; without this the
    second recipe would silently get the first recipe's cached module.
    """
    cached = sys.modules.get(top)
    if cached is None:
        return
    local = next((r / f for r in roots for f in (f"{top}.py", top) if (r / f).exists()), None)
    if local is None:
        return
    origin = Path(getattr(cached, "__file__", "") or "")
    if origin.resolve() not in (local.resolve(), (local / "__init__.py").resolve()):
        for name in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
            del sys.modules[name]


def import_callable(spec: str, roots: Sequence[Path], where: str) -> object:
    """Import ``'pkg.module:attr'`` with ``roots`` importable; ``where`` names the recipe field in errors."""
    module_name, _, attr = spec.partition(":")
    _forget_shadowed(module_name.partition(".")[0], roots)
    with import_paths(roots):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise_if_interrupted(e)  # Ctrl-C stays an interrupt, never a RecipeError
            raise RecipeError(
                f"{where}: cannot import module '{module_name}' ({e}); searched the recipe's folder and "
                f"model.pythonpath: {', '.join(str(r) for r in roots)}"
            ) from e
        except Exception as e:  # the module itself is broken (SyntaxError, NameError, a failing top-level call)
            raise_if_interrupted(e)  # Ctrl-C stays an interrupt, never a RecipeError
            raise RecipeError(
                f"{where}: importing module '{module_name}' raised {describe_exception(e)}; fix that module "
                f"so that `import {module_name}` succeeds from the recipe's folder"
            ) from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{where}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def describe_exception(e: BaseException) -> str:
    """``ValueError: bad size at net.py:12``: the type, the first line of the message, and the user's line."""
    text = str(e).strip()
    line = user_line([(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)])
    if isinstance(e, SyntaxError) and e.filename:  # the offending line is not in the traceback
        line = user_line([(e.filename, e.lineno)])
    return f"{type(e).__name__}{': ' + text.splitlines()[0] if text else ''}{f' at {line}' if line else ''}"


def import_roots(loaded: LoadedRecipe) -> list[Path]:
    return [loaded.base_dir, *(loaded.resolve(p) for p in loaded.recipe.model.pythonpath)]


def load_model(loaded: LoadedRecipe) -> nn.Module:
    """The recipe's model in eval mode, weights loaded; errors name the recipe field."""
    spec = loaded.recipe.model
    label = loaded.label
    if spec.exported is not None:
        path = loaded.resolve(spec.exported)
        if not path.is_file():
            raise RecipeError(f"{label}: model.exported: file not found: {path}")
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise_if_interrupted(e)  # Ctrl-C stays an interrupt, never a RecipeError
            raise RecipeError(f"{label}: model.exported: {path.name} is not a torch.export program ({e})") from e
        _check_exported_batch(program, loaded, path.name)
        return program.module()
    assert spec.factory is not None  # guaranteed by ModelSpec's validator
    factory = import_callable(spec.factory, import_roots(loaded), f"{label}: model.factory")
    if not callable(factory):
        raise RecipeError(f"{label}: model.factory: '{spec.factory}' is not callable")
    _check_kwargs(factory, spec.kwargs, f"{label}: model.kwargs", spec.factory)
    try:
        # Seeded, and without touching the caller's RNG: a factory that initialises weights
        # randomly (no `weights:` file) must still give the same model on every load.
        with torch.random.fork_rng():
            torch.manual_seed(loaded.recipe.seed)
            model = factory(**spec.kwargs)
    except Exception as e:  # the user's constructor failed: bad input, not an effopt bug
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt, never a RecipeError
        kwargs = f" with model.kwargs {dict(spec.kwargs)}" if spec.kwargs else ""
        raise RecipeError(
            f"{label}: model.factory: calling '{spec.factory}'{kwargs} raised {describe_exception(e)}; "
            "fix the factory or model.kwargs"
        ) from e
    if not isinstance(model, nn.Module):
        raise RecipeError(f"{label}: model.factory: '{spec.factory}' returned {type(model).__name__}, not an nn.Module")
    if spec.weights is not None:
        _load_weights(model, loaded.resolve(spec.weights), label)
    return model.eval()


def _check_kwargs(factory: object, kwargs: dict[str, object], where: str, name: str) -> None:
    """Reject kwargs the factory's signature cannot take, before calling it.

    This tells a wrong ``model.kwargs`` (``num_clases: 10``) apart from a factory
    that fails inside: ``DigitsNet`` with ``{num_clases: 10}`` → "... cannot be called
    with {'num_clases': 10}: got an unexpected keyword argument 'num_clases'; it takes num_classes".
    """
    try:
        signature = inspect.signature(factory)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins and some C types have none: let the call decide
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        params = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise RecipeError(
            f"{where}: '{name}' cannot be called with {dict(kwargs)}: {e}; "
            f"it takes {', '.join(params) or 'no arguments'}"
        ) from e


def _check_exported_batch(program: torch.export.ExportedProgram, loaded: LoadedRecipe, file: str) -> None:
    """A program exported with a fixed batch fails its own guard at any other batch size, deep inside
    calibration or verification; say so up front, naming the input and the two ways out."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    for index, (spec, node) in enumerate(zip(loaded.recipe.inputs, placeholders)):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or not isinstance(value.shape[0], int):
            continue  # dim 0 is symbolic: any batch works
        fixed = int(value.shape[0])
        if spec.dynamic_batch:
            raise RecipeError(
                f"{loaded.label}: model.exported: {file} was exported with a fixed batch of {fixed} for input "
                f"'{spec.name}', but inputs[{index}].dynamic_batch is true (the default). Re-export with a free batch: "
                f"torch.export.export(model, (x,), dynamic_shapes={{'{spec.name}': {{0: torch.export.Dim.AUTO}}}}) "
                f"with an example batch of 2 or more, or set inputs[{index}].dynamic_batch: false and shape[0]: {fixed}"
            )
        if spec.shape[0] != fixed:
            raise RecipeError(
                f"{loaded.label}: inputs[{index}].shape: {file} takes a batch of exactly {fixed} for '{spec.name}' "
                f"(got shape[0] = {spec.shape[0]}); set shape[0]: {fixed}"
            )


def _load_weights(model: nn.Module, path: Path, label: str) -> None:
    if not path.is_file():
        raise RecipeError(
            f"{label}: model.weights: file not found: {path} (for the bundled example, `make demo` trains it)"
        )
    where = f"{label}: model.weights"
    state = load_torch_file(path, where, _SAVE_STATE_DICT, RecipeError)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise RecipeError(f"{where}: {path.name} holds a {type(state).__name__}, not a state_dict. {_SAVE_STATE_DICT}")
    _check_shapes(model, state, where, path.name)
    try:
        result = model.load_state_dict(state, strict=False)
    except Exception as e:  # a non-tensor value, or a module's own _load_from_state_dict check
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt, never a RecipeError
        raise RecipeError(f"{where}: {path.name} cannot be loaded into {type(model).__name__}: "
                          f"{describe_exception(e)}. {_SAVE_STATE_DICT}") from e
    if result.missing_keys or result.unexpected_keys:
        nested = [k for k in ("state_dict", "model", "model_state_dict") if isinstance(state.get(k), dict)]
        hint = (f"; {path.name} looks like a training checkpoint: save checkpoint['{nested[0]}'] on its own"
                if nested else "; check model.kwargs match the checkpoint")
        raise RecipeError(
            f"{where}: {path.name} does not match {type(model).__name__}: "
            f"missing {list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}{hint}"
        )


_SAVE_STATE_DICT = "Save the weights with torch.save(model.state_dict(), path)."


def _check_shapes(model: nn.Module, state: dict, where: str, file: str) -> None:
    """Every tensor whose name matches but whose shape does not, both shapes listed.

    ``load_state_dict`` stops at the first mismatch with a RuntimeError; this names them all:
    ``fc.weight: file [10, 64], model [12, 64]``.
    """
    own = model.state_dict()
    wrong = [
        f"{k}: file {list(v.shape)}, model {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        listed = "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        raise RecipeError(
            f"{where}: {file} has the right names but {len(wrong)} tensor(s) of the wrong shape for "
            f"{type(model).__name__}: {listed}. The model was built differently from the one saved: check "
            "model.kwargs (e.g. the number of classes or channels)"
        )
