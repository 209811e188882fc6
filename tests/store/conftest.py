from __future__ import annotations

import pytest

from adapters_store import AdapterStore

from .helpers import BASE, MODULE_SHAPES


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(root):
    return AdapterStore(root, MODULE_SHAPES, BASE)


@pytest.fixture
def reopen(root):
    """Open the same store root again (a restart)."""

    def _reopen(**kwargs) -> AdapterStore:
        return AdapterStore(root, MODULE_SHAPES, kwargs.pop("base", BASE), **kwargs)

    return _reopen
