"""Real data named by the recipe: load it, check it against ``inputs``, batch it.

A sample is ``(x1, ..., xk)`` or ``(x1, ..., xk, label)`` for a model with k
inputs; a bare tensor is one input without a label. Shapes and dtypes are
checked against the recipe's ``inputs`` on the first sample, so a mismatch
fails before any pass runs, naming both sides.
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
from effopt.optimizer.frontend.model import import_callable, import_roots
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


def _from_file(path: Path, inputs: Sequence[InputSpec], where: str) -> Dataset:
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    if path.suffix == ".npz":
        arrays = dict(np.load(path))
    elif path.suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        arrays = loaded if isinstance(loaded, dict) else {f"arr_{i}": t for i, t in enumerate(loaded)}
    else:
        raise DataError(f"{where}: {path.name}: expected a .npz or .pt file")
    names = [i.name for i in inputs]
    if all(n in arrays for n in names):
        tensors = [torch.as_tensor(arrays[n]) for n in names]
        label = arrays.get("y", arrays.get("labels"))
    else:
        keys = list(arrays)
        if len(keys) < len(names):
            raise DataError(f"{where}: {path.name} has arrays {keys}; expected keys {names} (+ optional 'y')")
        tensors = [torch.as_tensor(arrays[k]) for k in keys[: len(names)]]
        label = arrays[keys[len(names)]] if len(keys) > len(names) else None
    if label is not None:
        tensors.append(torch.as_tensor(label))
    return TensorDataset(*tensors)


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
        made = obj() if callable(obj) and not isinstance(obj, Dataset) else obj
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
    has_labels = _check(dataset[0], inputs, where)
    return DataSource(spec.source, dataset, spec.batch_size, has_labels)
