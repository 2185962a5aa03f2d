"""The recipe schema, version 1: what a user writes in ``recipe.yaml``.

Every model is frozen and forbids unknown keys, so a typo (``weigths:``) fails
when the recipe loads, with its field path, instead of being ignored.
Pass options are validated against each pass's own ``Options`` model by
`effopt.recipes.loading.resolve_passes`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from effopt.passes.finetuning import FineTuneConfig

DType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"]
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Strict):
    """Where the model comes from: a Python factory (+ optional state_dict) or a saved torch.export program."""

    factory: str | None = Field(None, description="'module:callable' returning an nn.Module; the recipe's folder is importable")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    weights: str | None = Field(None, description="state_dict file (torch.save), relative to the recipe")
    exported: str | None = Field(None, description="a torch.export program (.pt2), relative to the recipe; instead of factory")
    leaf_modules: tuple[str, ...] = Field((), description="submodule paths or class names fx must not trace into")
    pythonpath: tuple[str, ...] = Field((), description="extra import folders, relative to the recipe")

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and not _FACTORY.match(v):
            raise ValueError(f"{v!r} must look like 'package.module:callable'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.factory is None) == (self.exported is None):
            raise ValueError("give exactly one of 'factory' (module:callable) or 'exported' (a .pt2 file)")
        if self.exported is not None and (self.weights or self.kwargs):
            raise ValueError("'weights' and 'kwargs' apply to 'factory' only; an exported program carries its weights")
        return self


class InputSpecModel(_Strict):
    """One model input: name, example shape, dtype; ``dynamic_batch`` lets dim 0 vary in the artefacts."""

    name: str = Field(description="argument name of the model's forward")
    shape: tuple[int, ...] = Field(description="example shape, e.g. [1, 1, 8, 8]; dim 0 is the batch")
    dtype: DType = Field("float32", description="tensor dtype")
    dynamic_batch: bool = Field(True, description="artefacts accept any batch size in dim 0")
    range: tuple[float, float] | None = Field(None, description="[low, high) of random values (integer inputs: token ids)")

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"every dimension must be a positive integer, got {list(v)}")
        return v

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError(f"{v!r} is not a valid argument name")
        return v


class PassSpec(_Strict):
    """A pass by name with its options (validated later against the pass's own Options model)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        """``fold_batchnorm`` or ``{name: quantize, mode: static}`` → name + options."""
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "options" not in data:
            rest = {k: v for k, v in data.items() if k != "name"}
            return {"name": data.get("name"), "options": rest}
        return data


class VerifySpec(_Strict):
    """How closely the optimized model must match the original."""

    rtol: float = Field(1e-4, ge=0, description="relative tolerance (numpy.allclose semantics)")
    atol: float = Field(1e-5, ge=0, description="absolute tolerance")
    samples: int = Field(4, ge=1, description="random input batches to compare on")
    batch: int = Field(8, ge=1, description="batch size of each random batch (when the batch is dynamic)")


class OutputSpec(_Strict):
    """Where artefacts go and which ones."""

    dir: str = Field("out", description="output folder, relative to the recipe; `-o DIR` overrides")
    formats: tuple[Literal["pt2", "onnx", "aoti"], ...] = Field(
        ("pt2", "onnx"), description="artefacts to emit; aoti (an AOTInductor package, compiled for this CPU) is opt-in"
    )


class DataSourceSpec(_Strict):
    """A data source: 'module:callable' (Dataset/DataLoader), a .npz/.pt file, or 'sklearn-digits[:train|:test]'."""

    source: str = Field(description="'pkg.module:callable', 'file.npz', 'file.pt' or 'sklearn-digits:test'")
    batch_size: int = Field(64, ge=1, description="samples per batch")
    subset: int | None = Field(None, ge=1, description="use only N samples: the first N, or a random N when seed is set")
    seed: int | None = Field(None, description="draw the subset at random with this seed (reproducible)")

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data


class DataSpec(_Strict):
    """Real data for verification, calibration and fine-tuning."""

    eval: DataSourceSpec | None = None
    calibration: DataSourceSpec | None = None
    train: DataSourceSpec | None = None


class GoalSpec(_Strict):
    """What the user wants from the optimized model; checked at the end of compile (exit 1 when missed)."""

    latency_budget_ms: float | None = Field(None, gt=0, description="predicted latency on the target at the recipe's batch must be at most this")
    min_speedup: float | None = Field(None, gt=0, description="predicted original/optimized latency ratio on the target must be at least this")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="largest allowed drop of the eval headline metric (top-1 as a fraction: 0.005 = 0.5 points)"
    )


class Recipe(_Strict):
    """A whole recipe file."""

    version: Literal[1] = Field(description="recipe schema version; this effopt reads version 1")
    model: ModelSpec
    inputs: tuple[InputSpecModel, ...] = Field(min_length=1)
    target: str = Field("x86-avx2", description="shipped hardware profile name, or a path to a profile YAML")
    passes: tuple[PassSpec, ...] = Field((), description="ordered passes; 'auto' (alone or as an item) lets the planner add passes")
    goal: GoalSpec = GoalSpec()
    task: Literal["auto", "classification", "regression", "generic"] = Field(
        "auto", description="how outputs are scored; auto = classification when eval data has labels"
    )
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="shorthand for goal.max_accuracy_drop")
    finetune: FineTuneConfig = Field(
        default_factory=FineTuneConfig, description="default fine-tuning for passes that recover accuracy (needs data.train)"
    )
    verify: VerifySpec = VerifySpec()
    output: OutputSpec = OutputSpec()
    data: DataSpec = DataSpec()
    seed: int = Field(0, description="seed of every random draw effopt makes")

    @field_validator("passes", mode="before")
    @classmethod
    def _auto_alone(cls, v: Any) -> Any:
        return ["auto"] if v == "auto" else v

    @model_validator(mode="after")
    def _one_accuracy_budget(self) -> Recipe:
        top, goal = self.max_accuracy_drop, self.goal.max_accuracy_drop
        if top is not None and goal is not None and top != goal:
            raise ValueError(f"max_accuracy_drop ({top}) and goal.max_accuracy_drop ({goal}) disagree; give one")
        return self

    @property
    def accuracy_budget(self) -> float | None:
        """The allowed accuracy drop, from either place it can be written."""
        return self.goal.max_accuracy_drop if self.goal.max_accuracy_drop is not None else self.max_accuracy_drop

    @property
    def auto(self) -> bool:
        return any(p.name == "auto" for p in self.passes)

    @field_validator("inputs")
    @classmethod
    def _unique_names(cls, v: tuple[InputSpecModel, ...]) -> tuple[InputSpecModel, ...]:
        names = [i.name for i in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"input names must be unique; repeated: {', '.join(dup)}")
        return v
