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


@pytest.fixture
def kernels_take_every_row(monkeypatch):
    """The kernels serve groups of any size: SURM Kronecker's gives groups of more than
    ``KRON_KERNEL_MAX_ROWS`` rows to the torch code, which many-row kernel tests must not test."""
    from server.methods import surm

    monkeypatch.setattr(surm, "KRON_KERNEL_MAX_ROWS", 1 << 40)
