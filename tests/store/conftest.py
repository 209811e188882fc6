from __future__ import annotations

import pytest

from adapters_store import AdapterStore

from . import backend_servers
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


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on loopback for the session; credentials in the environment."""
    env = pytest.MonkeyPatch()
    for k, v in backend_servers.S3_ENV.items():
        env.setenv(k, v)
    try:
        with backend_servers.moto_server() as endpoint:
            yield endpoint
    finally:
        env.undo()


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL cluster (initdb + pg_ctl in a temporary folder) on loopback for the session."""
    with backend_servers.postgres_server() as dsn:
        yield dsn
