"""Run a Facet server for real: a subprocess (``python -m ...``) or uvicorn in a thread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, alive=lambda: True, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), "server exited:\n" + (log.read_text()[-4000:] if log else "")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not ready in time:\n" + (log.read_text()[-4000:] if log else ""))


@contextmanager
def server_process(
    module: str, args: list[str], log: Path, env: dict | None = None, timeout: float = 120
) -> Iterator[str]:
    """``python -m module --host 127.0.0.1 --port <free> *args`` from the repo root; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, alive=lambda: proc.poll() is None, log=log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def server_thread(app) -> Iterator[str]:
    """uvicorn serving ``app`` on a free loopback port from a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
