"""Find, read and validate hardware profiles: shipped ones by name, user ones by path.

    load_profile("a100")                               # shipped: effopt/hardware_profiles/a100.yaml
    load_profile("boards/my-board.yaml", base_dir=dir)  # user file, relative to the recipe's folder

Every failure is a `ProfileError` whose message says which file, where in it, and what to do;
never a raw YAML or pydantic traceback.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from effopt.errors import ProfileError
from effopt.hardware_profiles.schema import HardwareProfile, MemoryLevel, PeakFlopsPerS

_PACKAGE = "effopt.hardware_profiles"
_SUFFIXES = (".yaml", ".yml")


def shipped_profiles() -> tuple[str, ...]:
    """Names of the profiles that ship with effopt, sorted: `('a100', 'arm-cortex-a', ...)`."""
    root = resources.files(_PACKAGE)
    return tuple(
        sorted(
            entry.name[: -len(".yaml")]
            for entry in root.iterdir()
            if entry.is_file() and entry.name.endswith(".yaml")
        )
    )


def load_profile(name_or_path: str | Path, base_dir: Path | None = None) -> HardwareProfile:
    """Load a shipped profile by bare name, or a user profile by path.

    A `Path`, or a string that ends in .yaml/.yml or contains a path separator, is a file: a
    relative one resolves against `base_dir` (the recipe's folder) when given, else the current
    directory. Anything else is the name of a shipped profile, e.g. `"h100-sxm"`.
    """
    if _looks_like_path(name_or_path):
        return _load_file(Path(name_or_path), base_dir)
    name = str(name_or_path)
    shipped = shipped_profiles()
    if name not in shipped:
        close = [n for n in shipped if name and name in n]
        close = close or difflib.get_close_matches(name, shipped)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ProfileError(
            f"unknown hardware profile '{name}'; {hint}shipped profiles are: {', '.join(shipped)}. "
            "A path to your own profile file ending in .yaml also works."
        )
    resource = resources.files(_PACKAGE).joinpath(name + ".yaml")
    return _parse(resource.read_text(encoding="utf-8"), source=str(resource))


def profile_from_dict(data: object, source: str = "<profile>") -> HardwareProfile:
    """Validate already-parsed profile data (e.g. a profile written inline in a recipe).

    `source` prefixes every error line, e.g. `digits.yaml: profile` gives
    `digits.yaml: profile: peak_flops_per_s.fp32: Input should be greater than 0 (got -1.0)`.
    """
    if not isinstance(data, Mapping):
        raise ProfileError(
            f"{source}: a hardware profile must be a mapping of fields (version, name, kind, "
            f"peak_flops_per_s, ...), got {type(data).__name__}"
        )
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(_format_validation_error(e, source)) from e


# -- files ---------------------------------------------------------------------------------------


def _looks_like_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return name_or_path.lower().endswith(_SUFFIXES) or any(s in name_or_path for s in separators)


def _load_file(path: Path, base_dir: Path | None) -> HardwareProfile:
    path = path.expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        where = f"base_dir {base_dir}" if base_dir is not None else "the current directory"
        hint = ""
        if path.stem in shipped_profiles():
            hint = f"; to use the shipped profile write '{path.stem}' without .yaml"
        raise ProfileError(
            f"hardware profile file not found: {path} "
            f"(relative paths resolve against {where}){hint}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read hardware profile: {e}") from e
    return _parse(text, source=str(path))


def _parse(text: str, source: str) -> HardwareProfile:
    try:
        data = yaml.load(text, Loader=_ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if mark is None:
            raise ProfileError(f"{source}: invalid YAML: {e.problem or e}") from e
        detail = e.problem or e.context or "cannot parse"
        if e.context and e.problem:
            context_mark = e.context_mark
            started = f" started on line {context_mark.line + 1}" if context_mark else ""
            detail += f" ({e.context}{started})"
        raise ProfileError(
            f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML at line {mark.line + 1}, "
            f"column {mark.column + 1}: {detail}"
        ) from e
    except yaml.YAMLError as e:
        raise ProfileError(f"{source}: invalid YAML: {e}") from e
    if data is None:
        raise ProfileError(
            f"{source}: the file is empty; a hardware profile needs version, name, description, "
            "kind, peak_flops_per_s, integer_only, memory, roofline_memory, structured_sparsity "
            "and op_overhead_s"
        )
    return profile_from_dict(data, source)


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e9` as a float (YAML 1.2) and rejects duplicate keys.

    PyYAML follows YAML 1.1, where `19.5e12` (no dot-and-signed exponent) is a *string*; and it
    keeps the last of two equal keys silently, which would let a typo'd profile rot unnoticed.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key '{key}' (first given on line {first_line[key] + 1}); "
                        "keep only one",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
            except TypeError:  # unhashable key: let the base class report it
                break
        return super().construct_mapping(node, deep=deep)


# Numbers follow YAML 1.2, not PyYAML's YAML 1.1: `19.5e12` and `1e9` are floats (1.1 wants a dot
# and a signed exponent, else it is a string), and `2:4` is the string '2:4' (1.1 reads it as the
# base-60 integer 124, which would make `structured_sparsity: 2:4` fail with a baffling message).
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ProfileLoader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^[-+]?0x[0-9a-fA-F_]+$"), list("-+0123456789")
)
_ProfileLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


# -- error messages ------------------------------------------------------------------------------

_MODELS_BY_PARENT: dict[str, type[BaseModel]] = {
    "": HardwareProfile,
    "peak_flops_per_s": PeakFlopsPerS,
    "memory[]": MemoryLevel,
}


_DERIVED = {
    "supported_dtypes": "it is derived from the keys of peak_flops_per_s; give a peak for each "
    "dtype the target computes in instead",
    "memory_bandwidth_bytes_per_s": "it is the bandwidth_bytes_per_s of the memory level named by "
    "roofline_memory; set it there",
    "memory_capacity_bytes": "it is the sum of capacity_bytes over non-cache memory levels; set "
    "those instead",
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    """`('memory', 0, 'capacity_bytes')` -> `memory[0].capacity_bytes`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parent_key(loc: tuple[int | str, ...]) -> str:
    """The shape of `loc` minus its last part, with indices blanked: `memory[]` for memory[0].x."""
    return "".join(
        "[]" if isinstance(p, int) else ("." if i else "") + p for i, p in enumerate(loc[:-1])
    )


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and loc:
            model = _MODELS_BY_PARENT.get(_parent_key(loc))
            if model is HardwareProfile and loc[-1] in _DERIVED:
                msg = f"not a field: {_DERIVED[str(loc[-1])]}"
            elif model is not None:
                allowed = list(model.model_fields)
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                msg = f"unknown field; {hint}allowed fields are {', '.join(allowed)}"
        value = item.get("input")
        shown = (
            f" (got {value!r})"
            if item["type"] != "missing" and isinstance(value, str | int | float | bool)
            else ""
        )
        where = f"{_format_loc(loc)}: " if loc else ""
        lines.append(f"{source}: {where}{msg}{shown}")
    return "\n".join(lines)
