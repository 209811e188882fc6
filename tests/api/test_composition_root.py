"""Route modules build nothing stateful: the composition root (``server.runtime``) does, once.

Checked on the source (every ``server/api/*.py``) and on a running app: the objects the routes use
are the ones on its runtime, built at start-up, and stopped at shutdown.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from server.adapters_service import AdapterService
from server.jobs.files import FileStore
from server.jobs.runner import JobRunner
from tests.api.conftest import serve

API = Path(__file__).resolve().parents[2] / "server" / "api"
# Classes whose instances hold state (a database, a thread, a cache, a model).
STATEFUL = {
    "AdapterService",
    "AdapterStore",
    "Engine",
    "FileStore",
    "JobDB",
    "JobRunner",
    "KeyQuotas",
    "Metrics",
    "Runtime",
    "from_settings",  # KeyQuotas.from_settings
}


def _called_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return names


def test_no_route_module_builds_a_stateful_object():
    modules = sorted(API.glob("*.py"))
    assert len(modules) > 10  # the glob found the package
    for path in modules:
        source = path.read_text(encoding="utf-8")
        assert "app_singleton" not in source and "get_or_create_" not in source, path.name
        built = _called_names(ast.parse(source)) & STATEFUL
        assert not built, f"{path.name} builds {sorted(built)}"
        assert "app.state." not in source.replace("request.app.state.runtime", ""), path.name


def test_server_api_runtime_is_gone():
    assert not (API / "runtime.py").exists()  # Runtime lives in server/runtime.py


@pytest.mark.asyncio
async def test_the_runtime_holds_what_the_routes_use_built_at_start_up(make_app):
    app = make_app()
    rt = app.state.runtime
    assert rt.metrics is not None and rt.adapters is None and rt.jobs is None  # before start-up
    async with serve(app) as client:
        assert isinstance(rt.adapters, AdapterService) and rt.adapters.engine is rt.engine
        assert rt.adapters.store is rt.store
        assert isinstance(rt.files, FileStore) and isinstance(rt.jobs, JobRunner)
        assert rt.jobs.adapters is rt.adapters  # fine-tunes store through the service
        assert rt.jobs._thread is not None  # started once ready
        assert (await client.get("/files")).status_code == 200
        assert (await client.get("/fine-tunes")).status_code == 200
        assert not hasattr(app.state, "fine_tunes") and not hasattr(app.state, "files")
    assert rt.jobs._thread is None and not rt.engine_alive()  # stopped at shutdown
