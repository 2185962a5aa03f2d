"""effopt.hardware_profiles.host: measuring this machine and writing the profile YAML."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from effopt.errors import ProfileError
from effopt.hardware_profiles import HardwareProfile, load_profile, profile_from_dict
from effopt.hardware_profiles.host import HostMeasurement, measure_host_details, profile_to_yaml

# A small hand-written profile with a cache level and a quoted '2:4'-style string field.
HAND_WRITTEN = {
    "version": 1,
    "name": "toy",
    "description": 'toy "accelerator" for tests',
    "kind": "cpu",
    "peak_flops_per_s": {"fp32": 1.0e9, "int8": 4.0e9},
    "integer_only": False,
    "memory": [
        {"name": "dram", "bandwidth_bytes_per_s": 1.0e9, "capacity_bytes": 1024, "holds": "both"},
        {"name": "l2", "capacity_bytes": 64, "holds": "both", "cache": True},
    ],
    "roofline_memory": "dram",
    "structured_sparsity": "2:4",
    "op_overhead_s": 1.0e-6,
}


@pytest.fixture(scope="module")
def measured() -> HostMeasurement:
    return measure_host_details(threads=1, quick=True)


def test_quick_measurement_is_a_valid_plausible_host_profile(measured: HostMeasurement) -> None:
    profile = measured.profile
    assert isinstance(profile, HardwareProfile)
    assert profile.name == "host" and profile.kind == "cpu" and not profile.integer_only
    assert profile.arch == {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine().lower())
    assert "measured by effopt profile-host" in profile.description
    assert profile.supports("fp32")
    assert 1e8 <= profile.peak("fp32") <= 1e13
    assert 1e8 <= profile.memory_bandwidth_bytes_per_s <= 1e12
    assert profile.roofline_memory == "dram" and profile.memory_capacity_bytes > 2**28
    assert 0 < profile.op_overhead_s < 1e-3
    assert profile.op_overhead_s == pytest.approx(measured.onnxruntime_op_overhead_s, rel=1e-3)  # the default
    assert measured.torch_op_overhead_s > 0 and measured.onnxruntime_call_overhead_s > 0
    assert all(level.cache for level in profile.memory if level.name != "dram")
    assert measured.threads == 1


def test_only_dtypes_that_run_fast_enough_enter_the_profile(measured: HostMeasurement) -> None:
    profile = measured.profile
    assert set(profile.supported_dtypes) <= set(measured.flops_per_s)
    for d in ("bf16", "fp16"):
        if d in measured.flops_per_s and measured.flops_per_s[d] < 0.5 * measured.flops_per_s["fp32"]:
            assert not profile.supports(d)
    assert not profile.supports("tf32") and not profile.supports("int4")


def test_measurement_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    measure_host_details(threads=1, quick=True)
    assert torch.get_num_threads() == before
    with pytest.raises(ProfileError, match="threads=0"):
        measure_host_details(threads=0, quick=True)


def test_yaml_round_trips_through_load_profile(measured: HostMeasurement, tmp_path: Path) -> None:
    text = profile_to_yaml(measured.profile, measured.notes)
    assert text.startswith("# Hardware profile 'host' written by effopt profile-host.")
    assert "# op_overhead_s: candidates measured" in text
    path = tmp_path / "host.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_profile(path) == measured.profile
    assert profile_to_yaml(load_profile(path), measured.notes) == text  # deterministic


def test_yaml_keys_follow_the_schema_order(measured: HostMeasurement) -> None:
    keys = [line.split(":")[0] for line in profile_to_yaml(measured.profile).splitlines() if line[:1].isalpha()]
    assert keys == [k for k in HardwareProfile.model_fields if k in keys]
    assert keys[0] == "version"


def test_yaml_round_trips_a_shipped_and_a_hand_written_profile(tmp_path: Path) -> None:
    for profile in (load_profile("cortex-m7"), load_profile("a100"), profile_from_dict(HAND_WRITTEN)):
        path = tmp_path / f"{profile.name}.yaml"
        path.write_text(profile_to_yaml(profile), encoding="utf-8")
        assert load_profile(path) == profile
