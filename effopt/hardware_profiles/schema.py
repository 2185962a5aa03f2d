"""Hardware profile schema (version 1): what a target computes in, how fast, and where data lives.

A profile is the only place target numbers come from. The cost model prices the same IR against
several profiles, so nothing here refers to a model, and nothing in the IR refers to a profile.

Units are in the names: `*_flops_per_s`, `*_bytes_per_s`, `*_bytes`, `*_s`. Integer throughput is
counted the same way as float throughput: 1 MAC = 2 ops, so an int8 peak of 624e12 means 312e12
int8 MACs per second. All peaks are *dense* figures; a 2:4-sparse speed-up is described by
`structured_sparsity`, never baked into a peak.

Worked example (A100): `peak("fp16")` is 312e12 and `memory_bandwidth_bytes_per_s` is 2.039e12,
so `ridge_flops_per_byte("fp16")` is about 153: a layer doing fewer than ~153 flops per byte it
moves is memory-bound on that GPU.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from effopt.errors import ProfileError

SCHEMA_VERSION = 1
"""The `version` every profile must declare. A bump ships `v1_to_v2()` (STYLE rule 20)."""

DType = Literal["fp32", "tf32", "fp16", "bf16", "int8", "int4"]
"""Compute dtypes a profile can quote a peak for. tf32 is a tensor-core mode for fp32 tensors."""

DTYPES: tuple[DType, ...] = get_args(DType)
"""Every `DType`, in canonical order (widest float first, then integers)."""

FLOAT_DTYPES: tuple[DType, ...] = ("fp32", "tf32", "fp16", "bf16")
INT_DTYPES: tuple[DType, ...] = ("int8", "int4")

Arch = Literal["x86_64", "aarch64", "armv7e-m", "cuda"]
"""Instruction-set families a profile can name (`HardwareProfile.arch`)."""

_Positive = Annotated[float, Field(gt=0)]


class PeakFlopsPerS(BaseModel):
    """Dense peak throughput per dtype; a dtype left out is one the target cannot compute in.

    Example: `{fp32: 19.5e12, int8: 624e12}` says fp32 and int8 run (int8 at 312e12 MACs/s),
    and that fp16 does not.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fp32: _Positive | None = Field(
        None, description="Dense fp32 FLOP/s on the non-tensor (vector/CUDA-core) path."
    )
    tf32: _Positive | None = Field(
        None, description="Dense FLOP/s of fp32 matmuls/convs run in TF32 tensor-core mode."
    )
    fp16: _Positive | None = Field(
        None, description="Dense fp16 FLOP/s (on tensor cores where the target has them)."
    )
    bf16: _Positive | None = Field(
        None, description="Dense bf16 FLOP/s (on tensor cores where the target has them)."
    )
    int8: _Positive | None = Field(
        None, description="Dense int8 ops/s, counting 1 MAC as 2 ops like FLOPs."
    )
    int4: _Positive | None = Field(
        None, description="Dense int4 ops/s, counting 1 MAC as 2 ops like FLOPs."
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> PeakFlopsPerS:
        if not self.dtypes:
            raise ValueError(
                "no dtype has a peak; give at least one of " + ", ".join(DTYPES)
            )
        return self

    @property
    def dtypes(self) -> tuple[DType, ...]:
        """The dtypes that have a peak, in canonical order: `(fp32, int8)` for the example above."""
        return tuple(d for d in DTYPES if getattr(self, d) is not None)


class MemoryLevel(BaseModel):
    """One level of the memory hierarchy, e.g. HBM, DRAM, L2, on-chip SRAM or flash.

    Example (MCU): `{name: flash, capacity_bytes: 2097152, holds: weights}` says weights, and only
    weights, live in 2 MiB of flash.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        min_length=1,
        description="Label unique within the profile, e.g. 'hbm2e', 'dram', 'l2', 'sram', 'flash'.",
    )
    bandwidth_bytes_per_s: _Positive | None = Field(
        None,
        description=(
            "Peak read bandwidth of this level. May be left out (null) for levels the cost model "
            "does not price; the level named by `roofline_memory` must have it."
        ),
    )
    capacity_bytes: int = Field(gt=0, description="Capacity of this level in bytes.")
    holds: Literal["weights", "activations", "both"] = Field(
        description=(
            "What the deployed model keeps here: 'weights' (e.g. MCU flash), 'activations' "
            "(e.g. MCU SRAM) or 'both' (GPU HBM, CPU DRAM)."
        )
    )
    cache: bool = Field(
        False,
        description=(
            "True for a hardware-managed cache (GPU L2, CPU L3): it mirrors another level, so its "
            "capacity does not add to what the model can store."
        ),
    )


class HardwareProfile(BaseModel):
    """A deployment target: dense compute peaks, memory levels, and fixed per-op costs.

    Read peaks through `peak(dtype)` (it raises `ProfileError` naming the profile and dtype when the
    target cannot compute in it) and bandwidth through `memory_bandwidth_bytes_per_s`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = Field(description="Schema version of this file; must be 1.")
    name: str = Field(
        min_length=1,
        description="Short identifier; for a shipped profile, the file name without .yaml.",
    )
    description: str = Field(
        min_length=1, description="One line saying which device this describes."
    )
    kind: Literal["gpu", "cpu", "mcu"] = Field(description="Device class: 'gpu', 'cpu' or 'mcu'.")
    arch: Arch | None = Field(
        None,
        description=(
            "Instruction-set family: 'x86_64', 'aarch64', 'armv7e-m' (Cortex-M4/M7) or 'cuda'. "
            "It decides which runtime's int8 kernels an artefact can target (model_int8.pt is built "
            "on torch's x86 kernels, so it needs 'x86_64'); left out, no such artefact is written."
        ),
    )
    peak_flops_per_s: PeakFlopsPerS = Field(
        description=(
            "Dense peak per dtype (ints as ops/s, 1 MAC = 2 ops). The keys given are the dtypes "
            "the target can compute in; `supported_dtypes` is derived from them."
        )
    )
    integer_only: bool = Field(
        description=(
            "True when no float layer can run at inference (int8 MCU runtimes); then "
            "peak_flops_per_s may list only integer dtypes."
        )
    )
    memory: tuple[MemoryLevel, ...] = Field(
        min_length=1,
        description=(
            "Memory levels, in any order, with unique names. Between them the non-cache levels "
            "must hold both weights and activations."
        ),
    )
    roofline_memory: str = Field(
        description=(
            "Name of the `memory` level whose bandwidth bounds memory-bound layers in the roofline "
            "(the main memory: HBM on a GPU, DRAM on a CPU). It must not be a cache and must have "
            "bandwidth_bytes_per_s."
        )
    )
    structured_sparsity: Literal["none", "2:4"] = Field(
        description="'2:4' when the hardware runs 2-of-4 sparse weights at up to 2x the dense peak."
    )
    op_overhead_s: float = Field(
        ge=0,
        description="Fixed cost per op (kernel launch, dispatch) added to its roofline time.",
    )
    accumulator_bits: int = Field(
        32,
        gt=0,
        description="Width of the integer accumulator in quantized dot products (usually 32).",
    )
    int8_weight_bits: int = Field(
        8,
        ge=2,
        le=8,
        description=(
            "Widest signed weight code range the target's int8 kernels multiply without overflow: 8, "
            "or 7 on x86 CPUs without VNNI, whose VPMADDUBSW adds two uint8 x int8 products into a "
            "saturating int16 (255 x 127 x 2 > 32767, but 255 x 63 x 2 fits). The quantize pass "
            "keeps int8 weights within it, as onnxruntime's and torch's reduce_range do."
        ),
    )

    channel_multiple: int = Field(
        1,
        ge=1,
        description=(
            "Channel counts the target's kernels run best in multiples of (the SIMD width in fp32 lanes "
            "on a CPU, the tensor-core tile on a GPU): the default `round_to` of prune_channels, so a "
            "pruned layer does not end on a ragged, slower tile."
        ),
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> HardwareProfile:
        floats = [d for d in self.peak_flops_per_s.dtypes if d in FLOAT_DTYPES]
        if self.integer_only and floats:
            raise ValueError(
                "integer_only is true but peak_flops_per_s lists float dtype(s) "
                f"{', '.join(floats)}; an integer-only target cannot compute in a float dtype: "
                "remove them or set integer_only: false"
            )
        names = [level.name for level in self.memory]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"memory level name(s) {', '.join(duplicates)} appear more than once; give each "
                "level a unique name"
            )
        if self.roofline_memory not in names:
            raise ValueError(
                f"roofline_memory '{self.roofline_memory}' is not a memory level; use one of "
                + ", ".join(names)
            )
        roofline = self.roofline_level
        if roofline.cache:
            raise ValueError(
                f"roofline_memory '{roofline.name}' is a cache; name the main memory level instead"
            )
        if roofline.bandwidth_bytes_per_s is None:
            raise ValueError(
                f"roofline_memory '{roofline.name}' has no bandwidth_bytes_per_s; "
                "the roofline needs it"
            )
        if self.weight_capacity_bytes == 0:
            raise ValueError(
                "no non-cache memory level holds weights; mark one with holds: weights or "
                "holds: both"
            )
        if self.activation_capacity_bytes == 0:
            raise ValueError(
                "no non-cache memory level holds activations; mark one with holds: activations or "
                "holds: both"
            )
        return self

    # -- compute -------------------------------------------------------------------------------

    @property
    def supported_dtypes(self) -> tuple[DType, ...]:
        """Dtypes the target computes in, canonical order; e.g. `('fp32', 'int8')` on x86-avx2."""
        return self.peak_flops_per_s.dtypes

    def supports(self, dtype: str) -> bool:
        """Whether the target can compute in `dtype`; `supports('fp16')` is False on x86-avx2."""
        return dtype in self.supported_dtypes

    def peak(self, dtype: str) -> float:
        """Dense peak for `dtype` in FLOP/s (ops/s for ints); e.g. `peak('int8')` is 624e12 on a100.

        Raises `ProfileError` naming the profile, the dtype and the dtypes it does support.
        """
        if dtype not in DTYPES:
            raise ProfileError(
                f"profile '{self.name}': '{dtype}' is not a dtype effopt knows; use one of "
                + ", ".join(DTYPES)
            )
        value = getattr(self.peak_flops_per_s, dtype)
        if value is None:
            raise ProfileError(
                f"profile '{self.name}' cannot compute in {dtype}; it supports "
                f"{', '.join(self.supported_dtypes)}: pick one of those or a different profile"
            )
        return value

    def ridge_flops_per_byte(self, dtype: str) -> float:
        """Arithmetic intensity where the roofline turns from memory- to compute-bound.

        `peak(dtype) / memory_bandwidth_bytes_per_s`: ~153 for fp16 on a100 (312e12 / 2.039e12).
        """
        return self.peak(dtype) / self.memory_bandwidth_bytes_per_s

    # -- memory --------------------------------------------------------------------------------

    @property
    def roofline_level(self) -> MemoryLevel:
        """The `memory` level named by `roofline_memory`."""
        for level in self.memory:
            if level.name == self.roofline_memory:
                return level
        raise ProfileError(  # unreachable after validation; kept so the query never returns None
            f"profile '{self.name}': roofline_memory '{self.roofline_memory}' is not a memory level"
        )

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        """Bandwidth the roofline uses: that of `roofline_memory` (2.039e12 on a100)."""
        bandwidth = self.roofline_level.bandwidth_bytes_per_s
        if bandwidth is None:  # unreachable after validation; kept so the query never returns None
            raise ProfileError(
                f"profile '{self.name}': roofline_memory '{self.roofline_memory}' has no bandwidth"
            )
        return bandwidth

    @property
    def weight_capacity_bytes(self) -> int:
        """Bytes available for weights: non-cache levels holding 'weights' or 'both'."""
        return sum(
            level.capacity_bytes
            for level in self.memory
            if not level.cache and level.holds in ("weights", "both")
        )

    @property
    def activation_capacity_bytes(self) -> int:
        """Bytes available for activations: non-cache levels holding 'activations' or 'both'."""
        return sum(
            level.capacity_bytes
            for level in self.memory
            if not level.cache and level.holds in ("activations", "both")
        )

    @property
    def memory_capacity_bytes(self) -> int:
        """Total non-cache bytes for weights and activations together.

        On a GPU weights and activations share HBM, so a model fits only if weights + activations
        <= this; on an MCU also check each against `weight_capacity_bytes` (flash) and
        `activation_capacity_bytes` (SRAM).
        """
        return sum(level.capacity_bytes for level in self.memory if not level.cache)
