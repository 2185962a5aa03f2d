"""Hardware profiles: the target numbers (peaks, bandwidth, capacity, overhead) for the cost model.

    from effopt.hardware_profiles import load_profile
    a100 = load_profile("a100")
    a100.peak("fp16")                      # 312e12 FLOP/s, dense
    a100.memory_bandwidth_bytes_per_s      # 2.039e12

Shipped profiles live next to this file as `<name>.yaml`; `shipped_profiles()` lists them.
"""

from effopt.hardware_profiles.loading import load_profile, profile_from_dict, shipped_profiles
from effopt.hardware_profiles.schema import (
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    SCHEMA_VERSION,
    DType,
    HardwareProfile,
    MemoryLevel,
    PeakFlopsPerS,
)

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "SCHEMA_VERSION",
    "DType",
    "HardwareProfile",
    "MemoryLevel",
    "PeakFlopsPerS",
    "load_profile",
    "profile_from_dict",
    "shipped_profiles",
]
