"""Tests for effopt.hardware_profiles: every shipped profile, the schema rules, loader errors."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path

import pydantic
import pytest
import yaml

from effopt.errors import ProfileError
from effopt.hardware_profiles import (
    DTYPES,
    FLOAT_DTYPES,
    HardwareProfile,
    load_profile,
    profile_from_dict,
    shipped_profiles,
)

REQUIRED_PROFILES = ("a100", "h100-sxm", "x86-avx2", "arm-cortex-a", "cortex-m7")

# A small valid profile; each bad case below changes one thing in a deep copy of it.
VALID = {
    "version": 1,
    "name": "toy",
    "description": "toy accelerator for tests",
    "kind": "cpu",
    "peak_flops_per_s": {"fp32": 1.0e9, "int8": 4.0e9},
    "integer_only": False,
    "memory": [
        {"name": "dram", "bandwidth_bytes_per_s": 1.0e9, "capacity_bytes": 1024, "holds": "both"},
        {"name": "l2", "capacity_bytes": 64, "holds": "both", "cache": True},
    ],
    "roofline_memory": "dram",
    "structured_sparsity": "none",
    "op_overhead_s": 1.0e-6,
}


def write_profile(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- shipped profiles ----------------------------------------------------------------------------


def test_required_profiles_ship_and_names_are_sorted() -> None:
    names = shipped_profiles()
    assert set(REQUIRED_PROFILES) <= set(names)
    assert list(names) == sorted(names)


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profile_loads_and_is_consistent(name: str) -> None:
    profile = load_profile(name)

    assert profile.version == 1
    assert profile.name == name, "a shipped profile's name must equal its file name"
    assert profile.supported_dtypes, "a profile must compute in at least one dtype"
    for dtype in DTYPES:  # supported <=> has a peak, and the peak is positive
        if profile.supports(dtype):
            assert profile.peak(dtype) > 0
        else:
            with pytest.raises(ProfileError, match=dtype):
                profile.peak(dtype)
    if profile.integer_only:
        assert not set(profile.supported_dtypes) & set(FLOAT_DTYPES)
    assert profile.memory_bandwidth_bytes_per_s > 0
    assert profile.weight_capacity_bytes > 0
    assert profile.activation_capacity_bytes > 0
    assert profile.memory_capacity_bytes >= max(
        profile.weight_capacity_bytes, profile.activation_capacity_bytes
    )
    assert profile.op_overhead_s >= 0


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profile_cites_a_source_for_every_figure(name: str) -> None:
    text = resources.files("effopt.hardware_profiles").joinpath(f"{name}.yaml").read_text("utf-8")
    keys = "fp32|tf32|fp16|bf16|int8|int4|bandwidth_bytes_per_s|capacity_bytes"
    figure = re.compile(rf"^\s*(?:-\s*)?({keys}):")
    figure_lines = [line for line in text.splitlines() if figure.match(line)]
    assert figure_lines, "the regex must find the figures, or this test checks nothing"
    uncited = [line for line in figure_lines if "#" not in line]
    assert not uncited, f"{name}.yaml: figures without a source comment: {uncited}"


def test_a100_figures_are_the_dense_datasheet_values() -> None:
    a100 = load_profile("a100")
    assert {d: a100.peak(d) for d in a100.supported_dtypes} == {
        "fp32": 19.5e12,
        "tf32": 156e12,
        "fp16": 312e12,
        "bf16": 312e12,
        "int8": 624e12,
        "int4": 1248e12,
    }
    assert a100.memory_bandwidth_bytes_per_s == 2.039e12
    assert a100.structured_sparsity == "2:4"
    assert a100.ridge_flops_per_byte("fp16") == pytest.approx(312e12 / 2.039e12)


def test_h100_peaks_are_dense_not_sparse() -> None:
    h100 = load_profile("h100-sxm")
    # The datasheet's headline numbers (989 TF32, 1979 FP16, 3958 INT8) are 2:4-sparse.
    assert h100.peak("tf32") == pytest.approx(494.5e12)
    assert h100.peak("fp16") == pytest.approx(989.5e12)
    assert h100.peak("bf16") == pytest.approx(989.5e12)
    assert h100.peak("int8") == pytest.approx(1979e12)
    assert h100.peak("fp32") == 67e12
    assert not h100.supports("int4")
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12


def test_cpu_profiles_lack_tensor_core_dtypes() -> None:
    x86 = load_profile("x86-avx2")
    arm = load_profile("arm-cortex-a")
    assert x86.supported_dtypes == ("fp32", "int8")
    assert arm.supported_dtypes == ("fp32", "fp16", "int8")
    assert x86.peak("int8") == 2 * x86.peak("fp32")


def test_mcu_profile_splits_weight_and_activation_memory() -> None:
    m7 = load_profile("cortex-m7")
    assert m7.integer_only
    assert m7.supported_dtypes == ("int8",)
    assert m7.weight_capacity_bytes == 2 * 1024 * 1024  # flash
    assert m7.activation_capacity_bytes == 512 * 1024  # AXI SRAM
    assert m7.memory_capacity_bytes == m7.weight_capacity_bytes + m7.activation_capacity_bytes


def test_peak_of_unsupported_dtype_names_profile_and_dtype() -> None:
    x86 = load_profile("x86-avx2")
    assert not x86.supports("fp16")
    with pytest.raises(ProfileError) as info:
        x86.peak("fp16")
    message = str(info.value)
    assert "x86-avx2" in message and "fp16" in message
    assert "fp32, int8" in message, "the message should say what the profile does support"


def test_peak_of_unknown_dtype_lists_known_dtypes() -> None:
    with pytest.raises(ProfileError, match="'fp8' is not a dtype.*fp32, tf32"):
        load_profile("a100").peak("fp8")


def test_profile_is_frozen_and_hashable() -> None:
    a100 = load_profile("a100")
    with pytest.raises(pydantic.ValidationError):
        a100.op_overhead_s = 0.0  # type: ignore[misc]
    assert hash(a100) == hash(load_profile("a100"))


# -- schema rules, through files a user would write ----------------------------------------------


def test_valid_toy_profile_loads(tmp_path: Path) -> None:
    # Precondition for the bad cases: VALID itself loads, so each failure below is its one change.
    profile = load_profile(write_profile(tmp_path / "toy.yaml", VALID))
    assert profile.supported_dtypes == ("fp32", "int8")
    assert profile.memory_capacity_bytes == 1024  # the cache level does not count


def _unknown_top_level_field(d: dict) -> None:
    d["bandwith_bytes_per_s"] = 1.0e9


def _unknown_peak_dtype(d: dict) -> None:
    d["peak_flops_per_s"]["fp8"] = 1.0e9


def _supported_dtypes_given(d: dict) -> None:
    d["supported_dtypes"] = ["fp32", "fp16"]


def _integer_only_with_fp32(d: dict) -> None:
    d["integer_only"] = True


def _no_peaks(d: dict) -> None:
    d["peak_flops_per_s"] = {}


def _zero_peak(d: dict) -> None:
    d["peak_flops_per_s"]["fp32"] = 0.0


def _negative_bandwidth(d: dict) -> None:
    d["memory"][0]["bandwidth_bytes_per_s"] = -1.0e9


def _roofline_level_missing(d: dict) -> None:
    d["roofline_memory"] = "hbm"


def _roofline_level_is_cache(d: dict) -> None:
    d["roofline_memory"] = "l2"
    d["memory"][1]["bandwidth_bytes_per_s"] = 1.0e12


def _roofline_level_without_bandwidth(d: dict) -> None:
    del d["memory"][0]["bandwidth_bytes_per_s"]


def _duplicate_level_names(d: dict) -> None:
    d["memory"][1]["name"] = "dram"


def _nothing_holds_activations(d: dict) -> None:
    d["memory"][0]["holds"] = "weights"


def _wrong_version(d: dict) -> None:
    d["version"] = 2


def _missing_kind(d: dict) -> None:
    del d["kind"]


def _unknown_memory_level_field(d: dict) -> None:
    d["memory"][0]["latency_s"] = 1e-7


def _unknown_arch(d: dict) -> None:
    d["arch"] = "x86"


BAD_PROFILES = [
    # (change, substrings the message must contain)
    (_unknown_top_level_field, ["bandwith_bytes_per_s", "unknown field", "roofline_memory"]),
    (_unknown_peak_dtype, ["peak_flops_per_s.fp8", "unknown field"]),
    (_supported_dtypes_given, ["supported_dtypes", "derived from the keys of peak_flops_per_s"]),
    (_integer_only_with_fp32, ["integer_only", "fp32", "cannot compute in a float dtype"]),
    (_no_peaks, ["peak_flops_per_s", "at least one of"]),
    (_zero_peak, ["peak_flops_per_s.fp32", "greater than 0", "(got 0.0)"]),
    (_negative_bandwidth, ["memory[0].bandwidth_bytes_per_s", "greater than 0", "-1000000000.0"]),
    (_roofline_level_missing, ["roofline_memory 'hbm'", "dram, l2"]),
    (_roofline_level_is_cache, ["'l2' is a cache"]),
    (_roofline_level_without_bandwidth, ["'dram' has no bandwidth_bytes_per_s"]),
    (_duplicate_level_names, ["dram", "more than once"]),
    (_nothing_holds_activations, ["holds activations"]),
    (_wrong_version, ["version", "(got 2)"]),
    (_missing_kind, ["kind", "Field required"]),
    (_unknown_memory_level_field, ["memory[0].latency_s", "unknown field", "capacity_bytes"]),
    (_unknown_arch, ["arch", "x86_64", "(got 'x86')"]),
]


def test_shipped_profiles_name_their_arch() -> None:
    arch = {name: load_profile(name).arch for name in ("a100", "h100-sxm", "x86-avx2", "arm-cortex-a", "cortex-m7")}
    assert arch == {"a100": "cuda", "h100-sxm": "cuda", "x86-avx2": "x86_64", "arm-cortex-a": "aarch64",
                    "cortex-m7": "armv7e-m"}


@pytest.mark.parametrize(
    ("change", "expected"), BAD_PROFILES, ids=[c.__name__.strip("_") for c, _ in BAD_PROFILES]
)
def test_bad_profile_is_rejected_with_file_and_field(
    tmp_path: Path, change, expected: list[str]
) -> None:
    data = copy.deepcopy(VALID)
    change(data)
    path = write_profile(tmp_path / "bad.yaml", data)

    with pytest.raises(ProfileError) as info:
        load_profile(path)

    message = str(info.value)
    assert message.startswith(str(path) + ": "), message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_every_error_gets_its_own_line(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    _zero_peak(data)
    _negative_bandwidth(data)
    with pytest.raises(ProfileError) as info:
        load_profile(write_profile(tmp_path / "bad.yaml", data))
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert "peak_flops_per_s.fp32" in lines[0] and "memory[0].bandwidth_bytes_per_s" in lines[1]


def test_yaml_numbers_follow_yaml_1_2(tmp_path: Path) -> None:
    # PyYAML alone reads 1e9 as the string '1e9' and an unquoted 2:4 as the base-60 integer 124.
    text = yaml.safe_dump(VALID, sort_keys=False)
    text = text.replace("structured_sparsity: none", "structured_sparsity: 2:4")
    text = text.replace("op_overhead_s: 1.0e-06", "op_overhead_s: 2e-6")
    assert "structured_sparsity: 2:4" in text and "op_overhead_s: 2e-6" in text
    assert yaml.safe_load(text)["structured_sparsity"] == 124
    path = tmp_path / "numbers.yaml"
    path.write_text(text, encoding="utf-8")

    profile = load_profile(path)

    assert profile.structured_sparsity == "2:4"
    assert profile.op_overhead_s == 2e-6


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nname: broken\npeak_flops_per_s: {fp32: 1.0e9\nkind: cpu\n")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    assert re.search(r"line [34]\b", message), message


def test_duplicate_key_is_an_error_not_last_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False) + "op_overhead_s: 9.0\n")
    with pytest.raises(ProfileError, match=r"dup\.yaml:\d+:\d+: .*duplicate key 'op_overhead_s'"):
        load_profile(path)


@pytest.mark.parametrize(("text", "expected"), [("", "empty"), ("- a\n- b\n", "got list")])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=expected) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_profile_from_dict_prefixes_source() -> None:
    data = copy.deepcopy(VALID)
    _zero_peak(data)
    with pytest.raises(ProfileError, match=r"^digits\.yaml: profile: peak_flops_per_s\.fp32: "):
        profile_from_dict(data, source="digits.yaml: profile")
    assert isinstance(profile_from_dict(VALID), HardwareProfile)


# -- finding profiles ----------------------------------------------------------------------------


def test_unknown_shipped_name_lists_shipped_names() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("h100")
    message = str(info.value)
    assert "'h100'" in message
    for name in shipped_profiles():
        assert name in message
    assert "did you mean 'h100-sxm'" in message
    assert ".yaml" in message, "the message should say a profile file path works too"


def test_user_profile_resolves_relative_to_base_dir(tmp_path: Path, monkeypatch) -> None:
    recipe_dir = tmp_path / "recipe"
    (recipe_dir / "boards").mkdir(parents=True)
    write_profile(recipe_dir / "boards" / "toy.yaml", VALID)
    monkeypatch.chdir(tmp_path)  # cwd is *not* the recipe folder, so only base_dir can find it

    with pytest.raises(ProfileError, match="not found"):
        load_profile("boards/toy.yaml")
    profile = load_profile("boards/toy.yaml", base_dir=recipe_dir)

    assert profile.name == "toy"


def test_bare_yaml_file_name_is_a_path_in_cwd(tmp_path: Path, monkeypatch) -> None:
    write_profile(tmp_path / "toy.yml", VALID)
    monkeypatch.chdir(tmp_path)
    assert load_profile("toy.yml").name == "toy"


def test_absolute_path_ignores_base_dir(tmp_path: Path) -> None:
    path = write_profile(tmp_path / "toy.yaml", VALID)
    assert load_profile(str(path), base_dir=tmp_path / "elsewhere").name == "toy"


def test_missing_file_names_the_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("nope.yaml", base_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "nope.yaml") in message
    assert "not found" in message


def test_shipped_name_with_yaml_suffix_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="write 'a100' without .yaml"):
        load_profile("a100.yaml", base_dir=tmp_path)
