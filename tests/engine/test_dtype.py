"""``--dtype auto``: what it picks for a device and a CPU flag set (faked: never this machine's)."""

from __future__ import annotations

import pytest
import torch

from server.engine.loader import auto_dtype, cpu_flags, dtype_name, pick_device_dtype
from server.settings import Settings

AVX512 = {"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cpu", AVX512, torch.float32),
        ("cpu", AVX512 | {"avx512_bf16"}, torch.bfloat16),
        ("cpu", AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16"}, torch.bfloat16),
        ("cpu", {"amx_tile", "amx_bf16"}, torch.bfloat16),
        ("cpu", {"amx_tile"}, torch.float32),  # tiles without bf16 math
        ("cpu", set(), torch.float32),  # flags unknown (no /proc/cpuinfo)
        ("cuda", set(), torch.bfloat16),
        ("mps", AVX512 | {"avx512_bf16"}, torch.float32),  # CPU flags say nothing of another device
    ],
)
def test_auto_dtype_by_device_and_cpu_flags(device, flags, expected):
    assert auto_dtype(device, frozenset(flags)) == expected


def test_settings_default_is_auto_and_explicit_values_win():
    assert Settings().dtype == "auto"
    bf16_cpu = frozenset(AVX512 | {"avx512_bf16"})
    assert pick_device_dtype(Settings(device="cpu"), flags=bf16_cpu)[1] == torch.bfloat16
    assert pick_device_dtype(Settings(device="cpu"), flags=frozenset(AVX512))[1] == torch.float32
    assert pick_device_dtype(Settings(device="cpu", dtype=None), flags=bf16_cpu)[1] == torch.bfloat16
    assert pick_device_dtype(Settings(device="cpu", dtype="float32"), flags=bf16_cpu)[1] == torch.float32
    assert pick_device_dtype(Settings(device="cpu", dtype="bfloat16"), flags=frozenset())[1] == torch.bfloat16


def test_unknown_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"dtype must be 'auto' or one of .*'bfloat16'.*got 'fp8'"):
        pick_device_dtype(Settings(device="cpu", dtype="fp8"))


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # aarch64 spelling
    assert cpu_flags(info) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_dtype_name_is_the_flag_spelling():
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16)] == ["float32", "bfloat16"]
