"""The fine-tuning service: win back the accuracy a pass gave away.

Pruning, quantization-aware training and the separable-conv rewrite all damage a
trained model a little and then retrain it briefly. This module is that retraining,
written once: a pass builds nothing itself, it calls ``ctx.services["finetune"].run(
student, teacher, config)`` and gets a `FineTuneResult` back.

What it does, and why:

* **Recovery loss.** With labels: cross-entropy (or MSE for regression) mixed with
  distillation. Without labels: distillation alone, the original model as teacher
  (Hinton et al.: ``KL(softmax(t/T) ‖ softmax(s/T)) · T²``), which is why a recipe
  needs no labelled training data to prune. Optionally, the outputs of named
  submodules are matched with MSE (feature distillation).
* **Model selection.** With eval data the student is scored (`effopt.optimizer.measure.evaluate`)
  every epoch or every N steps; the best state is kept in memory and restored at the
  end, and ``patience`` stops the run after N evaluations without improvement.
* **Budgets.** ``epochs`` or ``steps``, and a hard wall-clock ``time_budget_s``. A loss
  that turns NaN/inf stops the run as ``diverged`` and the best state is restored (an
  error when there is no eval data, since then there is no good state to go back to).
* **Determinism.** Shuffling comes from ``torch.Generator().manual_seed(seed)``; dropout
  draws from the global RNG, so the run happens inside ``torch.random.fork_rng`` seeded
  with the same seed: two runs give bitwise-identical weights (same thread count), and
  the caller's RNG state is left untouched.
* **Iterative pruning.** `snapshot`/`restore` save and rewind weights, and ``on_step``
  runs after every optimizer step (e.g. to re-apply a pruning mask), so a
  prune → rewind → retrain loop (lottery ticket) needs nothing more from this module.

Example::

    tuner = FineTuner(train_source, eval_source, "classification", seed=0)
    result = tuner.run(pruned, original, FineTuneConfig(epochs=2, patience=1))
    result.initial_headline, result.best_headline     # 0.81 -> 0.97 (top-1)

The recipe's ``finetune:`` block reaches every pass through ``FineTuner.defaults``: a run uses
what the pass's config sets explicitly, then what the block sets, then the pass's own defaults
(`effopt.passes.finetuning.with_defaults`); ``result.config`` is what it used.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from tqdm import tqdm

from effopt.errors import DataError, PassError
from effopt.optimizer.frontend.data import Batch, DataSource, split_sample
from effopt.passes.finetuning import DEFAULT_EPOCHS, FineTuneConfig, with_defaults
from effopt.optimizer.measure.evaluate import Evaluation, Task, eval_mode, evaluate, first_tensor

__all__ = [
    "DEFAULT_EPOCHS",
    "FineTuneConfig",
    "FineTuneResult",
    "FineTuner",
    "LossMode",
    "SERVICE_KEY",
    "StopReason",
    "distillation_loss",
    "resolve_loss",
    "restore",
    "snapshot",
]

#: The key under which the compiler puts a `FineTuner` in ``PassContext.services``.
SERVICE_KEY = "finetune"

#: Epochs when a config gives neither ``epochs`` nor ``steps``.

LossMode = Literal["labels", "distill", "labels+distill"]
StopReason = Literal["budget_steps", "early_stopping", "time_budget", "diverged"]


@dataclass(frozen=True)
class FineTuneResult:
    """What a fine-tuning run did; the headline is `Evaluation.headline` on the eval data.

    ``history`` holds ``(step, headline)`` for every evaluation, starting with step 0
    (before training). Without eval data the headlines are None, the history is empty
    and ``best_step`` is the last step (the final state is kept).

    Example: ``FineTuneResult(steps=42, epochs_completed=2, best_step=21,
    best_headline=0.97, initial_headline=0.61, history=((0, 0.61), (21, 0.97), (42, 0.96)),
    stopped_because="budget_steps", seconds=1.3, loss="distill")``: the state after step
    21 was restored.
    """

    steps: int
    epochs_completed: int
    best_step: int
    best_headline: float | None
    initial_headline: float | None
    history: tuple[tuple[int, float], ...]
    stopped_because: StopReason
    seconds: float
    loss: LossMode
    config: FineTuneConfig | None = None  # what the run used: the pass's config over the recipe's defaults


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state_dict (parameters and buffers).

    Why a copy: ``state_dict()`` returns views that later optimizer steps would change.
    Example (lottery-ticket rewind): ``init = snapshot(m)``; train; prune;
    ``restore(m, init)``; retrain with the mask.
    """
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def restore(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` (from `snapshot`) back into ``module`` in place and return it.

    In place, so optimizers and masks that hold the parameter objects stay valid.
    """
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True)
    return module


def resolve_loss(requested: str, has_labels: bool, has_teacher: bool, source: str) -> LossMode:
    """Turn ``loss: auto`` into a concrete loss and check that what it needs exists.

    Example: ``resolve_loss("auto", False, True, "calib")`` is ``"distill"``;
    ``resolve_loss("labels", False, True, "calib")`` raises `DataError` naming ``calib``.
    """
    if requested == "auto":
        if has_labels and has_teacher:
            return "labels+distill"
        if has_teacher:
            return "distill"
        if has_labels:
            return "labels"
        raise DataError(
            f"fine-tuning on {source}: the data has no labels and no teacher model was given, "
            "so there is nothing to learn from; give labelled training data or a teacher"
        )
    if "labels" in requested and not has_labels:
        raise DataError(f"fine-tuning on {source}: loss {requested!r} needs labels but the data has none; use 'distill'")
    if "distill" in requested and not has_teacher:
        raise PassError(f"fine-tuning on {source}: loss {requested!r} needs a teacher model but none was given")
    return requested  # type: ignore[return-value]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, task: Task) -> torch.Tensor:
    """Hinton's soft-target loss for classification, MSE to the teacher otherwise.

    Classification: ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` over dim 1, averaged over
    the other positions (the batch for ``[N, C]`` logits). The ``T²`` keeps gradient
    magnitudes comparable across temperatures. Example: identical logits give 0; logits
    ``[0, 0]`` vs teacher ``[0, ln 3]`` at T=1 give ``KL((¼, ¾) ‖ (½, ½)) ≈ 0.1308``.
    """
    if task != "classification":
        return F.mse_loss(student, teacher)
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean() * temperature**2


def _label_loss(output: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output, labels.long())
    if labels.numel() != output.numel():
        raise DataError(
            f"fine-tuning: labels of shape {list(labels.shape)} cannot be compared with outputs of shape "
            f"{list(output.shape)} for task {task!r}"
        )
    return F.mse_loss(output, labels.to(output.dtype).reshape(output.shape))


def _make_optimizer(config: FineTuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(
    config: FineTuneConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedule over the whole budget; e.g. step with 300 steps: ×0.1 at 100 and 200."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if config.scheduler == "step":
        third = max(1, total_steps // 3)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[third, 2 * third], gamma=0.1)
    return None


def _train_mode(model: nn.Module, freeze_batchnorm: bool) -> nn.Module:
    """Training mode, optionally with every BatchNorm left in eval mode (frozen statistics)."""
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    return model


@contextmanager
def _leave_in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Hand the student back in eval mode however the run ends (an error included)."""
    try:
        yield model
    finally:
        model.eval()


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class _FeatureTaps:
    """Forward hooks that record named submodule outputs of student and teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, names: tuple[str, ...]) -> None:
        self.names = names
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        if not names:
            self.handles: list[torch.utils.hooks.RemovableHandle] = []
            return
        if teacher is None:
            raise PassError(f"fine-tuning: feature_matching {list(names)} needs a teacher model but none was given")
        s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
        for name in names:
            missing = [who for who, mods in (("student", s_modules), ("teacher", t_modules)) if name not in mods]
            if missing:
                raise PassError(
                    f"fine-tuning: feature_matching module {name!r} does not exist in the {' and '.join(missing)}; "
                    "use a name from named_modules() present in both"
                )
        self.handles = [s_modules[n].register_forward_hook(self._recorder(self.student_out, n)) for n in names]
        self.handles += [t_modules[n].register_forward_hook(self._recorder(self.teacher_out, n)) for n in names]

    @staticmethod
    def _recorder(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            store[name] = first_tensor(output, f"feature_matching module {name!r}")

        return hook

    def loss(self) -> torch.Tensor | None:
        terms = []
        for name in self.names:
            if name not in self.student_out or name not in self.teacher_out:
                raise PassError(
                    f"fine-tuning: feature_matching module {name!r} was not called in the forward pass of the "
                    f"{'student' if name not in self.student_out else 'teacher'}; match a module that runs"
                )
            s, t = self.student_out[name], self.teacher_out[name]
            if s.shape != t.shape:
                raise PassError(
                    f"fine-tuning: feature_matching module {name!r} outputs {list(s.shape)} in the student but "
                    f"{list(t.shape)} in the teacher; match only modules whose outputs keep their shape"
                )
            terms.append(F.mse_loss(s, t.detach()))
        self.student_out.clear()
        self.teacher_out.clear()
        return torch.stack(terms).sum() if terms else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def _taps(student: nn.Module, teacher: nn.Module | None, names: tuple[str, ...]) -> Iterator[_FeatureTaps]:
    taps = _FeatureTaps(student, teacher, names)
    try:
        yield taps
    finally:
        taps.remove()


@dataclass
class _Tracker:
    """Best state so far and the early-stopping counter (mutable, private to one run)."""

    patience: int | None
    best_headline: float | None = None
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    last_eval_step: int = -1

    def record(self, step: int, headline: float, student: nn.Module) -> bool:
        """Note a score; returns True when patience has run out."""
        self.last_eval_step = step
        if self.best_headline is None or headline > self.best_headline:
            self.best_headline, self.best_step, self.best_state = headline, step, snapshot(student)
            self.stale = 0
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience


@dataclass(frozen=True)
class FineTuner:
    """The fine-tuning service a pass finds in ``ctx.services["finetune"]``.

    ``train`` feeds the optimizer (labels optional), ``eval_data`` scores the student for
    early stopping and best-state selection (None: keep the final state). ``task``
    decides the losses and the headline; ``seed`` makes every run reproducible.
    ``defaults`` is the recipe's ``finetune:`` block: each run's config is laid over it
    (`with_defaults`), so ``run(m, t, FineTuneConfig(epochs=2))`` under a recipe with
    ``finetune: {lr: 0.01}`` trains 2 epochs at lr 0.01.
    Classification eval data must carry labels; for regression/generic the headline is
    agreement with the teacher, so a teacher is needed when there is eval data.
    """

    train: DataSource
    eval_data: DataSource | None
    task: Task
    seed: int = 0
    defaults: FineTuneConfig | None = None

    def evaluate(self, model: nn.Module, teacher: nn.Module | None) -> Evaluation | None:
        """Score ``model`` on the eval data (agreement vs ``teacher`` when given); None without eval data."""
        if self.eval_data is None:
            return None
        return evaluate(model, self.eval_data, self.task, reference=teacher)

    def _check(self, teacher: nn.Module | None, config: FineTuneConfig) -> LossMode:
        mode = resolve_loss(config.loss, self.train.has_labels, teacher is not None, self.train.name)
        if self.eval_data is None:
            if config.patience is not None:
                raise DataError(f"fine-tuning: patience={config.patience} needs eval data to watch, but none was given")
            return mode
        if self.task == "classification" and not self.eval_data.has_labels:
            raise DataError(
                f"fine-tuning: eval data {self.eval_data.name} has no labels, so top-1 cannot be measured; "
                "give labelled eval data or none (the final state is then kept)"
            )
        if self.task != "classification" and teacher is None:
            raise PassError(
                f"fine-tuning: task {self.task!r} is scored by agreement with a teacher, but none was given"
            )
        return mode

    def _loader(self, batch_size: int) -> DataLoader:
        drop_last = len(self.train) > batch_size
        return DataLoader(
            self.train.dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def run(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        config: FineTuneConfig,
        params: Iterable[nn.Parameter] | None = None,
        on_step: Callable[[nn.Module, int], None] | None = None,
    ) -> FineTuneResult:
        """Fine-tune ``student`` in place towards ``teacher``/labels and return what happened.

        ``params`` limits what is trained (default: every parameter that requires grad).
        ``on_step(student, step)`` runs under ``no_grad`` after each optimizer step, e.g.
        to zero pruned weights again. On return the student holds its best state (by the
        eval headline) or its final state (no eval data), in eval mode. The teacher runs
        in eval mode under ``no_grad`` and gets its modes back afterwards.

        ``config``'s explicitly set fields override ``defaults``, whose explicitly set fields
        override ``config``'s own defaults (see `with_defaults`).

        Raises:
            DataError: the chosen loss needs labels the training data lacks, or the eval
                data cannot score the task.
            PassError: the loss or feature matching needs a teacher that is missing, or a
                feature_matching module is missing or changes shape.
        """
        config = with_defaults(config, self.defaults)
        mode = self._check(teacher, config)
        trainable = [p for p in (student.parameters() if params is None else params) if p.requires_grad]
        if not trainable:
            raise PassError("fine-tuning: no trainable parameters (all have requires_grad=False or none were given)")
        loader = self._loader(config.batch_size)
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise DataError(f"fine-tuning: training data {self.train.name} is empty")
        total = config.steps if config.steps is not None else config.epochs * steps_per_epoch  # type: ignore[operator]
        device = trainable[0].device
        start = time.perf_counter()
        tracker = _Tracker(config.patience)
        history: list[tuple[int, float]] = []
        bar_off = not config.progress or not sys.stderr.isatty()
        with (
            _leave_in_eval_mode(student),
            torch.random.fork_rng(devices=_cuda_devices()),
            eval_mode(teacher),
            _taps(student, teacher, config.feature_matching) as taps,
            tqdm(total=total, desc="fine-tune", unit="step", leave=False, disable=bar_off, file=sys.stderr) as bar,
        ):
            torch.manual_seed(self.seed)

            def score(step: int) -> bool:
                ev = self.evaluate(student, teacher)
                assert ev is not None  # only called with eval data
                history.append((step, ev.headline))
                bar.set_postfix({ev.headline_name: f"{ev.headline:.4f}"}, refresh=False)
                return tracker.record(step, ev.headline, student)

            if self.eval_data is not None:
                score(0)
            optimizer = _make_optimizer(config, trainable)
            scheduler = _make_scheduler(config, optimizer, total)
            _train_mode(student, config.freeze_batchnorm)
            step, epochs_done, stopped = 0, 0, None
            while stopped is None:
                for index, sample in enumerate(loader):
                    batch = split_sample(sample, self.train.has_labels)
                    loss = self._loss(student, teacher, batch, mode, config, taps, device)
                    if not math.isfinite(float(loss.detach())):
                        if self.eval_data is None:
                            raise PassError(
                                f"fine-tuning: the loss became {float(loss.detach())} at step {step + 1} and there is no "
                                f"eval data to fall back on a good state; lower lr (now {config.lr:g})"
                            )
                        stopped = "diverged"
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    step += 1
                    if on_step is not None:
                        with torch.no_grad():
                            on_step(student, step)
                    bar.update(1)
                    end_of_epoch = index + 1 == steps_per_epoch
                    epochs_done += int(end_of_epoch)
                    due = end_of_epoch if config.eval_every == "epoch" else step % config.eval_every == 0
                    if self.eval_data is not None and due and score(step):
                        stopped = "early_stopping"
                    elif step >= total:
                        stopped = "budget_steps"
                    elif config.time_budget_s is not None and time.perf_counter() - start >= config.time_budget_s:
                        stopped = "time_budget"
                    if stopped is not None:
                        break
            if self.eval_data is not None and tracker.last_eval_step != step:
                score(step)
        if tracker.best_state is not None:
            restore(student, tracker.best_state)
        return FineTuneResult(
            steps=step,
            epochs_completed=epochs_done,
            best_step=tracker.best_step if self.eval_data is not None else step,
            best_headline=tracker.best_headline,
            initial_headline=history[0][1] if history else None,
            history=tuple(history),
            stopped_because=stopped,
            seconds=time.perf_counter() - start,
            loss=mode,
            config=config,
        )

    def _loss(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: Batch,
        mode: LossMode,
        config: FineTuneConfig,
        taps: _FeatureTaps,
        device: torch.device,
    ) -> torch.Tensor:
        inputs = tuple(t.to(device) for t in batch.inputs)
        output = first_tensor(student(*inputs), f"training data {self.train.name}")
        need_teacher = mode != "labels" or bool(config.feature_matching)
        target = None
        if need_teacher and teacher is not None:
            with torch.no_grad():
                target = first_tensor(teacher(*inputs), f"training data {self.train.name}").detach()
        terms: list[torch.Tensor] = []
        if mode == "labels" or mode == "labels+distill":
            assert batch.labels is not None  # resolve_loss checked has_labels
            weight = 1.0 if mode == "labels" else 1.0 - config.alpha
            terms.append(weight * _label_loss(output, batch.labels.to(device), self.task))
        if mode == "distill" or mode == "labels+distill":
            assert target is not None  # resolve_loss checked the teacher
            weight = 1.0 if mode == "distill" else config.alpha
            terms.append(weight * distillation_loss(output, target, config.temperature, self.task))
        features = taps.loss()
        if features is not None:
            terms.append(config.feature_weight * features)
        return torch.stack(terms).sum()
