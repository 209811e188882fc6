"""Real backend servers for the contract tests, started on loopback by the tests themselves:

* an S3-compatible server: ``moto_server`` (from ``moto[server]``) as a subprocess on a free port,
  stopped by its pid;
* PostgreSQL: ``initdb`` + ``pg_ctl`` on a temporary directory and a free port, stopped at the
  end. As root, both run as the ``postgres`` user (or ``nobody``): PostgreSQL refuses root.

``open_store(spec)`` opens an ``AdapterStore`` on the backends a spec names; the crash tests pass
the same spec (JSON) to a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "facet-test",
    "AWS_SECRET_ACCESS_KEY": "facet-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (rc={proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3 endpoint URL on loopback for the duration of the context."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise RuntimeError("moto_server is missing: install the dev extras (moto[server])")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3_ENV},
    )
    try:
        _wait_for_port(port, proc, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, 9)
        proc.wait(timeout=30)


def _pg_user() -> tuple[list[str], int | None]:
    """The command prefix that runs PostgreSQL's tools, and the uid to own its folder (as root)."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"], pw.pw_uid
    raise RuntimeError("running as root without a 'postgres' or 'nobody' user to run PostgreSQL as")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A libpq DSN (trust auth, user ``facet``) of a fresh PostgreSQL cluster on loopback."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError(
            "initdb/pg_ctl not found: install PostgreSQL (Debian: apt-get install postgresql; .ci/run does)"
        )
    prefix, uid = _pg_user()
    base = Path(tempfile.mkdtemp(prefix="facet-pg-"))
    data = base / "data"
    if uid is not None:
        os.chown(base, uid, -1)
    port = free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([*prefix, *args], capture_output=True, timeout=120, cwd=base)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.decode(errors='replace')[-2000:]}")

    try:
        run(initdb, "-D", str(data), "-U", "facet", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {port} -k {base} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
        run(pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "-t", "60", "start")
        try:
            yield f"postgresql://facet@127.0.0.1:{port}/postgres"
        finally:
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def new_database(server_dsn: str) -> str:
    """A fresh, empty database on the server; its DSN."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_dsn.rsplit("/", 1)[0] + "/" + name


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"facet-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def open_store(spec: dict, **kwargs):
    """An ``AdapterStore`` on the backends of ``spec``: ``root``, ``blob`` ("local" or "s3", with
    ``endpoint`` and ``bucket``), ``index`` ("sqlite" or "postgres", with ``dsn``)."""
    from adapters_store import AdapterStore
    from adapters_store.blobs_s3 import S3BlobStore
    from adapters_store.index_pg import PostgresIndex

    from .helpers import BASE, MODULE_SHAPES

    blobs = None
    if spec["blob"] == "s3":
        blobs = S3BlobStore(spec["bucket"], "store", endpoint_url=spec["endpoint"])
    index = PostgresIndex(spec["dsn"]) if spec["index"] == "postgres" else None
    return AdapterStore(spec["root"], MODULE_SHAPES, BASE, blobs=blobs, index=index, **kwargs)
