"""The bundled real example: a small BatchNorm CNN trained on scikit-learn's digits.

Why this model: it is the smallest *trained* network that still has every site the
optimizer's structural passes look for -- a conv without bias followed by BatchNorm2d,
a conv with bias followed by BatchNorm2d, a Linear followed by BatchNorm1d, and a
Dropout -- so ``fold_batchnorm`` and ``remove_dropout`` have real work to do and the
accuracy check after optimization is meaningful (random weights would hide accuracy
regressions).

Why this data set: ``sklearn.datasets.load_digits`` ships inside scikit-learn (1797
8x8 grey-scale images, pixel values 0..16), so the example runs offline and trains in
a few seconds on a laptop CPU.

Usage::

    python -m examples.digits --out recipes/checkpoints/digits.pt --seed 0 --epochs 30
    # digits: test accuracy 0.978 -> recipes/checkpoints/digits.pt

Recipes can name the data sources as ``examples.digits:eval_dataset`` and
``examples.digits:train_dataset``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DigitsNet",
    "digits_split",
    "eval_dataset",
    "train_dataset",
    "evaluate",
    "train",
    "main",
]

#: Pixel values in ``load_digits`` are integers 0..16; dividing by this maps them to [0, 1].
PIXEL_MAX: float = 16.0
#: The fraction of the 1797 images held out for testing (450 images with seed-independent size).
TEST_SIZE: float = 0.25
BATCH_SIZE: int = 64
LEARNING_RATE: float = 3e-3


class DigitsNet(nn.Module):
    """A small CNN for ``[N, 1, 8, 8]`` digit images, built to exercise the optimizer.

    Layout (shapes for one image)::

        x [1, 8, 8]
        conv1 3x3, 1->16, no bias ─ bn1 ─ relu        [16, 8, 8]   conv without bias + BN
        conv2 3x3, 16->32, bias   ─ bn2 ─ relu        [32, 8, 8]   conv with bias + BN
        pool  maxpool 2x2                             [32, 4, 4]
        conv3 3x3, 32->32, bias   ─ bn3 ─ relu        [32, 4, 4]
        gap   adaptive avgpool 1 ─ flatten            [32]
        drop  Dropout(0.1)                            [32]         removed by the optimizer
        fc1   Linear 32->64 ─ bn4 (BatchNorm1d) ─ relu [64]        linear + BN1d
        fc2   Linear 64->num_classes                  [10]

    Example: ``DigitsNet()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc1 = nn.Linear(32, 64)
        self.bn4 = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        x = self.drop(x)
        x = self.relu(self.bn4(self.fc1(x)))
        return self.fc2(x)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(X_train, y_train, X_test, y_test)`` as a fixed stratified split.

    The split is stratified so every class keeps its ~10% share in both halves, and
    seeded so the test set a recipe evaluates on is the one the checkpoint was scored
    on. ``X`` is float32 ``[N, 1, 8, 8]`` in [0, 1]; ``y`` is int64. With the default
    ``TEST_SIZE`` of 0.25 the shapes are ``[1347, 1, 8, 8]`` and ``[450, 1, 8, 8]``.
    """
    digits = load_digits()
    x = (digits.images.astype(np.float32) / PIXEL_MAX)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def train_dataset(seed: int = 0) -> TensorDataset:
    """The training split as ``(x, y)`` tensors; usable as ``examples.digits:train_dataset``.

    Calibration passes want in-distribution inputs that are *not* the test set, so
    recipes should calibrate on this and evaluate on :func:`eval_dataset`.
    """
    x_train, y_train, _, _ = digits_split(seed)
    return TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))


def eval_dataset(seed: int = 0) -> TensorDataset:
    """The held-out test split as ``(x, y)`` tensors; usable as ``examples.digits:eval_dataset``.

    Example: ``len(eval_dataset()) == 450`` and ``eval_dataset()[0][0].shape == (1, 8, 8)``.
    """
    _, _, x_test, y_test = digits_split(seed)
    return TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in one batch (450 images fit easily).

    The caller owns the model's mode; this does not switch it to eval, so an accidental
    training-mode evaluation shows up as a lower number instead of being papered over.
    """
    x, y = dataset.tensors
    predictions = model(x).argmax(dim=1)
    return float((predictions == y).to(torch.float64).mean().item())


def train(seed: int = 0, epochs: int = 30) -> tuple[DigitsNet, float]:
    """Train :class:`DigitsNet` deterministically and return it in eval mode with its test accuracy.

    Determinism: the weights come from ``torch.manual_seed(seed)`` and the batch order
    from a private ``torch.Generator`` seeded with ``seed``, so two runs with the same
    seed and thread count produce identical state_dicts. The global seed is set because
    ``nn.Module`` initialisers take no generator argument; the caller's RNG state is
    restored afterwards so importing code is not perturbed.

    Example: ``model, acc = train(seed=0, epochs=30)`` takes a few seconds on a CPU and
    gives ``acc`` around 0.98 on the 450 test images.
    """
    x_train, y_train, _, _ = digits_split(seed)
    train_set = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    test_set = eval_dataset(seed)

    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DigitsNet()
        # Dropout draws from the global RNG during training; seeding it above keeps
        # those masks reproducible too.
        loader = DataLoader(
            train_set,
            batch_size=BATCH_SIZE,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, epochs * len(loader))
        )
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                scheduler.step()
    finally:
        torch.set_rng_state(rng_state)

    model.eval()
    return model, evaluate(model, test_set)


def _save_atomically(state: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``state`` to ``out`` via ``out.tmp`` + ``os.replace``.

    Why: a killed run must never leave a truncated checkpoint that a later recipe
    would load without complaint.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: train, save the state_dict and print one summary line."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.digits",
        description="Train the DigitsNet example on sklearn's digits and save its state_dict.",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init and shuffling")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; fixed so results match across machines (default 1)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, accuracy = train(seed=args.seed, epochs=args.epochs)
    _save_atomically(model.state_dict(), args.out)
    print(f"digits: test accuracy {accuracy:.3f} → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
