"""The fine-tuning configuration: pure schema, so recipes can embed it without importing torch.

`effopt.optimizer.train.finetune` is the service that runs it. A recipe's top-level ``finetune:``
block is the default of every fine-tuning pass, and what a pass's own options set explicitly
overrides it (`with_defaults`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

DEFAULT_EPOCHS = 3


class FineTuneConfig(BaseModel):
    """How to fine-tune: optimizer, schedule, budget, stopping rule and loss.

    Exactly one of ``epochs`` and ``steps`` is set; giving neither means
    ``epochs = 3``. Example: ``FineTuneConfig(steps=200, eval_every=50, patience=2)``
    trains at most 200 steps, scores every 50 and stops after two scores in a row
    that do not beat the best so far.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="Optimizer: sgd (with momentum), adam, or adamw (decoupled weight decay)."
    )
    lr: float = Field(1e-3, gt=0, description="Initial learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (adam, sgd) or decoupled weight decay (adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum; used by sgd only.")
    scheduler: Literal["none", "cosine", "step"] = Field(
        "cosine",
        description="Learning-rate schedule over the whole budget: constant, cosine annealing to 0, "
        "or ×0.1 after each third of the steps.",
    )
    epochs: PositiveInt | None = Field(None, description="Passes over the training data; exclusive with steps.")
    steps: PositiveInt | None = Field(None, description="Optimizer steps; exclusive with epochs.")
    batch_size: PositiveInt = Field(
        64, description="Training batch size. A final batch smaller than this is dropped each epoch."
    )
    patience: PositiveInt | None = Field(
        None,
        description="Early stopping: stop after this many evaluations in a row without a new best headline "
        "(needs eval data). None: never stop early.",
    )
    eval_every: Literal["epoch"] | PositiveInt = Field(
        "epoch", description="Score the student on the eval data after every epoch, or every N steps."
    )
    time_budget_s: float | None = Field(
        None,
        ge=0,
        description="Hard wall-clock limit in seconds, checked after every step; the run stops at the first "
        "step past it and keeps the best state so far.",
    )
    loss: Literal["auto", "labels", "distill", "labels+distill"] = Field(
        "auto",
        description="Recovery loss. auto: labels+distill when the training data has labels and there is a "
        "teacher, distill when it has no labels, labels when there is no teacher.",
    )
    temperature: float = Field(4.0, gt=0, description="Distillation temperature T (soft targets softmax(z/T)).")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the distillation term in labels+distill: (1-alpha)·labels + alpha·KD."
    )
    feature_matching: tuple[str, ...] = Field(
        (),
        description="Names of submodules (as in named_modules) whose outputs the student matches to the "
        "teacher's with MSE; each must exist in both models.",
    )
    feature_weight: float = Field(1.0, ge=0, description="Weight of each feature-matching MSE term.")
    freeze_batchnorm: bool = Field(
        False,
        description="Keep BatchNorm layers in eval mode while training, so their running statistics stay "
        "those of the original model (usual for quantization-aware training).",
    )
    progress: bool = Field(True, description="Show a progress bar on stderr (only when stderr is a terminal).")

    @model_validator(mode="after")
    def _one_budget(self) -> FineTuneConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"give either epochs ({self.epochs}) or steps ({self.steps}), not both")
        if self.epochs is None and self.steps is None:
            # the default budget, filled in after validation so that ``model_fields_set`` still says
            # the user gave no budget (`with_defaults` then takes the recipe's)
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        return self


_BUDGET = ("epochs", "steps")


def _sets_budget(config: FineTuneConfig) -> bool:
    """Whether ``epochs`` or ``steps`` was given explicitly (not the default ``epochs = 3``)."""
    return any(name in config.model_fields_set and getattr(config, name) is not None for name in _BUDGET)


def with_defaults(config: FineTuneConfig, defaults: FineTuneConfig | None) -> FineTuneConfig:
    """The configuration a fine-tuning run uses: a pass's ``config`` over the recipe's ``defaults``.

    Each field comes from the first of: what ``config`` sets explicitly, what ``defaults`` (the
    recipe's ``finetune:`` block) sets explicitly, ``config``'s own default. So a pass's defaults
    (QAT's ``lr = 1e-4``) hold until the recipe says otherwise, and a pass option always wins.
    ``epochs`` and ``steps`` are one budget: whoever sets either sets both. Extra fields of an
    options subclass (QAT's ``learnable_scales``) are dropped.

    Example: recipe ``finetune: {lr: 0.5, steps: 100}`` with ``qat: {epochs: 2}`` gives
    ``lr = 0.5, epochs = 2, steps = None``; with ``qat: {lr: 1e-5}`` it gives ``lr = 1e-5,
    steps = 100``; with no ``finetune:`` block, ``qat: {}`` keeps QAT's ``lr = 1e-4, epochs = 3``.
    """
    values = {name: getattr(config, name) for name in FineTuneConfig.model_fields}
    if defaults is not None:
        for name in FineTuneConfig.model_fields:
            if name not in _BUDGET and name in defaults.model_fields_set and name not in config.model_fields_set:
                values[name] = getattr(defaults, name)
        if _sets_budget(defaults) and not _sets_budget(config):
            values |= {name: getattr(defaults, name) for name in _BUDGET}
    return FineTuneConfig(**values)
