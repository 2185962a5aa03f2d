"""Real data named by the recipe: load it, check it against ``inputs``, batch it.

A sample is ``(x1, ..., xk)`` or ``(x1, ..., xk, label)`` for a model with k
inputs; a bare tensor is one input without a label. Shapes and dtypes are
checked against the recipe's ``inputs``, so a mismatch fails before any pass
runs, naming both sides.

Every sample is also checked for NaN and Inf, and a source with any is refused
(`DataError`, exit 2) naming the first sample index and how many there are. Why
refuse rather than skip: a NaN input makes every metric NaN (a cosine of
``nan`` in the evaluation table) and every verification comparison vacuous,
while silently dropping samples would change the very numbers the recipe's
accuracy goal is judged on. The user decides which samples to drop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from effopt.errors import DataError
from effopt.optimizer.ir.core import InputSpec
from effopt.optimizer.frontend.files import load_npz, load_torch_file
from effopt.optimizer.frontend.model import describe_exception, import_callable, import_roots
from effopt.optimizer.ir.trace import raise_if_interrupted
from effopt.recipes.loading import LoadedRecipe
from effopt.recipes.schema import DataSourceSpec

DIGITS_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Batch:
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None


@dataclass(frozen=True)
class DataSource:
    """A checked, batchable dataset plus where it came from (for messages and the report)."""

    name: str
    dataset: Dataset
    batch_size: int
    has_labels: bool

    def batches(self) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
        for sample in loader:
            yield split_sample(sample, self.has_labels)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def sklearn_digits(split: str = "all") -> TensorDataset:
    """scikit-learn's 1797 bundled 8×8 digits as ([N,1,8,8] float32 in [0,1], int64 labels).

    ``train``/``test`` are a fixed stratified 75/25 split (random_state=0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    if split != "all":
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=y
        )
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def split_sample(sample: object, has_labels: bool) -> Batch:
    """A loader sample → `Batch`: the last item is the label when the source has labels."""
    if isinstance(sample, torch.Tensor):
        return Batch((sample,), None)
    items = tuple(sample)  # type: ignore[arg-type]
    if has_labels:
        return Batch(tuple(items[:-1]), items[-1])
    return Batch(items, None)


def _save_hint(names: Sequence[str]) -> str:
    """How to write a data file effopt reads: ``np.savez(path, x=x, y=labels)`` for inputs ``x``."""
    args = ", ".join(f"{n}={n}" for n in names)
    entries = ", ".join(f"{n!r}: {n}" for n in names)
    return f"Save plain arrays: np.savez(path, {args}, y=labels) or torch.save({{{entries}, 'y': labels}}, path)."


def _from_file(path: Path, inputs: Sequence[InputSpec], where: str) -> Dataset:
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    names = [i.name for i in inputs]
    fix = _save_hint(names)
    if path.suffix == ".npz":
        arrays: dict[str, object] = dict(load_npz(path, where, fix, DataError))
    elif path.suffix == ".pt":
        loaded = load_torch_file(path, where, fix, DataError)
        if isinstance(loaded, dict):
            arrays = {str(k): v for k, v in loaded.items()}
        elif isinstance(loaded, torch.Tensor):
            arrays = {"arr_0": loaded}
        elif isinstance(loaded, (list, tuple)):
            arrays = {f"arr_{i}": t for i, t in enumerate(loaded)}
        else:
            raise DataError(f"{where}: {path.name} holds a {type(loaded).__name__}; expected a dict, tuple or list "
                            f"of tensors. {fix}")
    else:
        raise DataError(f"{where}: {path.name}: expected a .npz or .pt file")
    if all(n in arrays for n in names):
        chosen = [(n, arrays[n]) for n in names]
        label_key = next((k for k in ("y", "labels") if k in arrays), None)
    else:
        keys = list(arrays)
        if len(keys) < len(names):
            raise DataError(f"{where}: {path.name} has arrays {keys}; expected keys {names} (+ optional 'y')")
        chosen = [(k, arrays[k]) for k in keys[: len(names)]]
        label_key = keys[len(names)] if len(keys) > len(names) else None
    if label_key is not None:
        chosen.append((label_key, arrays[label_key]))
    tensors = [_as_tensor(key, value, where, path.name, fix) for key, value in chosen]
    lengths = {key: len(t) if t.dim() else 0 for (key, _), t in zip(chosen, tensors)}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        sizes = ", ".join(f"'{k}' {n}" for k, n in lengths.items())
        raise DataError(f"{where}: {path.name}: the arrays must all have one row per sample, with the same number of "
                        f"rows; got {sizes}")
    return TensorDataset(*tensors)


def _as_tensor(key: str, value: object, where: str, file: str, fix: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except Exception as e:  # strings, ragged lists, unsupported dtypes (uint16 before torch 2.3, ...)
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt
        dtype = getattr(value, "dtype", type(value).__name__)
        raise DataError(f"{where}: {file}: '{key}' ({dtype}) is not a numeric array torch can use "
                        f"({describe_exception(e)}). {fix}") from e


def _dataset(spec: DataSourceSpec, loaded: LoadedRecipe, inputs: Sequence[InputSpec], where: str) -> Dataset:
    src = spec.source
    if src.startswith("sklearn-digits"):
        split = src.partition(":")[2] or "all"
        if split not in ("all", "train", "test"):
            raise DataError(f"{where}: sklearn-digits split must be train, test or all, got {split!r}")
        return sklearn_digits(split)
    if src.endswith((".npz", ".pt")):
        return _from_file(loaded.resolve(src), inputs, where)
    if ":" in src:
        obj = import_callable(src, import_roots(loaded), where)
        try:
            made = obj() if callable(obj) and not isinstance(obj, Dataset) else obj
        except Exception as e:  # the user's data code failed: bad input
            raise_if_interrupted(e)  # Ctrl-C stays an interrupt
            raise DataError(f"{where}: calling '{src}' raised {describe_exception(e)}; fix the data function") from e
        if isinstance(made, DataLoader):
            made = made.dataset
        if not isinstance(made, Dataset):
            raise DataError(f"{where}: '{src}' returned {type(made).__name__}; expected a torch Dataset or DataLoader")
        return made
    raise DataError(f"{where}: {src!r} is not 'module:callable', a .npz/.pt file, or sklearn-digits[:train|:test]")


def _check(sample: object, inputs: Sequence[InputSpec], where: str) -> bool:
    """Check one sample against the declared inputs; returns whether it carries a label."""
    items = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)  # type: ignore[arg-type]
    if len(items) not in (len(inputs), len(inputs) + 1):
        raise DataError(
            f"{where}: a sample has {len(items)} tensors; the recipe declares {len(inputs)} input(s) "
            f"({', '.join(i.name for i in inputs)}), optionally followed by a label"
        )
    for item, spec in zip(items, inputs):
        t = torch.as_tensor(item)
        if tuple(t.shape) != tuple(spec.shape[1:]):
            raise DataError(
                f"{where}: sample shape {list(t.shape)} does not match inputs '{spec.name}' shape "
                f"{list(spec.shape)} without its batch dim ({list(spec.shape[1:])})"
            )
        if str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise DataError(
                f"{where}: sample dtype {str(t.dtype).removeprefix('torch.')} does not match inputs "
                f"'{spec.name}' dtype {spec.dtype}"
            )
    return len(items) == len(inputs) + 1


def load_source(spec: DataSourceSpec, loaded: LoadedRecipe, inputs: Sequence[InputSpec], role: str) -> DataSource:
    """Load ``data.<role>`` and check its first sample against ``inputs``."""
    where = f"{loaded.label}: data.{role} ({spec.source})"
    dataset = _dataset(spec, loaded, inputs, where)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(f"{where}: the dataset has no len(); effopt needs a map-style Dataset") from e
    if n == 0:
        raise DataError(f"{where}: the dataset is empty")
    if spec.subset is not None and spec.subset < n:
        if spec.seed is None:
            indices = list(range(spec.subset))
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
            indices = sorted(int(i) for i in order[: spec.subset])
        dataset = Subset(dataset, indices)
    has_labels = _check(_sample(dataset, 0, where), inputs, where)
    _check_all(dataset, inputs, has_labels, where)
    return DataSource(spec.source, dataset, spec.batch_size, has_labels)


def _sample(dataset: Dataset, index: int, where: str) -> object:
    """``dataset[index]``, with the user's failure turned into a DataError naming the sample."""
    try:
        return dataset[index]
    except Exception as e:
        raise_if_interrupted(e)  # Ctrl-C stays an interrupt
        where_sample = f"{where}: reading sample {_source_index(dataset, index)}"
        raise DataError(f"{where_sample} raised {describe_exception(e)}") from e


def _source_index(dataset: Dataset, index: int) -> int:
    """The index in the user's source of ``dataset[index]`` (a `Subset` picks a subset of the source's indices)."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    return index


def _tensors_of(dataset: Dataset) -> tuple[list[torch.Tensor], list[int] | None] | None:
    """The columns of a (subset of a) `TensorDataset`, and which rows; None for any other dataset."""
    rows: list[int] | None = None
    while isinstance(dataset, Subset):
        picked = [int(i) for i in dataset.indices]
        rows = picked if rows is None else [picked[i] for i in rows]
        dataset = dataset.dataset
    if not isinstance(dataset, TensorDataset):
        return None
    return list(dataset.tensors), rows


def _check_all(dataset: Dataset, inputs: Sequence[InputSpec], has_labels: bool, where: str) -> None:
    """Refuse a source with a NaN or Inf anywhere (inputs or float labels), or a sample unlike the first.

    For a `TensorDataset` (``.npz``, ``.pt``, sklearn-digits) this is one vectorised
    check per array; any other dataset is read sample by sample, once. E.g. a
    ``data.npz`` whose ``x[17]`` and ``x[40]`` hold a NaN → ``sample 17 has NaN or
    Inf in 'x' (2 of 200 samples have non-finite values); effopt refuses ...``.
    Indices are the source's own, also under ``subset``.
    """
    names = [i.name for i in inputs] + (["label"] if has_labels else [])
    columns = _tensors_of(dataset)
    bad: list[tuple[int, str]] = []  # (index in the source, tensor name), in source order
    if columns is not None:
        tensors, rows = columns
        source_index = torch.tensor(rows, dtype=torch.long) if rows is not None else torch.arange(len(tensors[0]))
        any_bad = torch.zeros(len(source_index), dtype=torch.bool)
        per_name: list[tuple[str, torch.Tensor]] = []
        for name, t in zip(names, tensors):
            if t.is_floating_point() or t.is_complex():
                view = t if rows is None else t[source_index]
                rows_bad = ~torch.isfinite(view.reshape(len(view), -1)).all(dim=1)
                per_name.append((name, rows_bad))
                any_bad |= rows_bad
        for position in torch.nonzero(any_bad).flatten().tolist():
            bad.append((int(source_index[position]), next(n for n, b in per_name if b[position])))
        total = len(source_index)
    else:
        total = len(dataset)  # type: ignore[arg-type]
        for index in range(total):
            sample = _sample(dataset, index, where)
            if index:
                _check(sample, inputs, f"{where}: sample {_source_index(dataset, index)}")
            items = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)  # type: ignore[arg-type]
            name = _bad_name(names, items)
            if name is not None:
                bad.append((_source_index(dataset, index), name))
    if bad:
        first, name = min(bad)
        raise DataError(
            f"{where}: sample {first} has NaN or Inf in '{name}' ({len(bad)} of {total} samples have non-finite "
            "values); effopt refuses such data rather than skip it, because NaN makes every metric and comparison "
            "meaningless: drop or repair those samples in the source (e.g. keep x[np.isfinite(x).reshape(len(x), -1)"
            ".all(1)])"
        )


def _bad_name(names: Sequence[str], items: Sequence[object]) -> str | None:
    """The name of the first floating tensor in ``items`` holding a NaN or Inf, or None."""
    for name, item in zip(names, items):
        try:
            t = torch.as_tensor(item)
        except Exception:  # a label that is no number (a string): not ours to judge here
            continue
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None
