"""Fixtures of the kernel tests (test_kernels*.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from server import kernels


@pytest.fixture(scope="session")
def k():
    """The built CPU kernel module (skipped where no C++ compiler exists; where one does, the
    build must succeed). Its fast paths are left on after the tests."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    from server.settings import Settings

    module = kernels.load(Settings().kernels_build_dir)
    assert module is not None, "a C++ compiler is present, so the kernels must build"
    yield module
    module.set_fast_paths_(True)


@pytest.fixture
def two_threads():
    """Two intra-op threads while the test runs, so ``at::parallel_for`` splits the rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
