"""Who runs a fine-tune job, and for how long: runner ids, their liveness, the lease heartbeat.

A runner claims a job with a lease (``JobDB.claim``) and renews it from a heartbeat thread
every third of the lease while it trains. Another replica may take the job back (queue it to
resume) only when the lease has run out, or when the runner is known dead:

* a runner id is ``<host>:<pid namespace>:<pid>`` (``local_runner_id``); one on this host and in
  this PID namespace whose process is gone is dead at once (a replica that restarts after a
  kill -9 resumes its job without waiting for the lease);
* a job whose runner id is the opening runner's own (an earlier runner of this process) is its
  to recover;
* anything else (another machine, another container) is trusted until its lease expires.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def local_runner_id() -> str:
    """This process's runner id: ``<host>:<pid namespace>:<pid>``."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, someone else's
        return False
    return False


def runner_is_dead(runner: str | None, me: str) -> bool:
    """Whether ``runner`` (a job row's) can be known dead without waiting for its lease."""
    if runner is None:  # a row from before leases: its runner was a single process, long gone
        return True
    if runner == me:
        return True
    theirs, mine = runner.rsplit(":", 2), me.rsplit(":", 2)
    if len(theirs) != 3 or not theirs[2].isdigit() or len(mine) != 3:
        return False
    return theirs[:2] == mine[:2] and _process_gone(int(theirs[2]))


class Heartbeat:
    """Renews one job's lease every ``interval_s`` until stopped; ``renew()`` returns
    ``(still held, cancel requested)``, and ``on_lost``/``on_cancel`` are called once each."""

    def __init__(
        self,
        renew: Callable[[], tuple[bool, bool]],
        interval_s: float,
        on_lost: Callable[[], None],
        on_cancel: Callable[[], None],
    ):
        self._renew = renew
        self.interval_s = interval_s
        self._on_lost, self._on_cancel = on_lost, on_cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="facet-job-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        cancelled = False
        while not self._stop.wait(self.interval_s):
            try:
                held, cancel = self._renew()
            except Exception:  # noqa: BLE001 - the index is away: retry at the next beat
                continue
            if not held:
                self._on_lost()
                return
            if cancel and not cancelled:
                cancelled = True
                self._on_cancel()
