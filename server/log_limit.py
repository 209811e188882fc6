"""Rate limit for log records that repeat under resource exhaustion.

When the process runs out of file descriptors, asyncio logs ``socket.accept() out of system
resource`` with a traceback on every accept retry, and every handler that fails to open a file
logs its own ``OSError: [Errno 24] Too many open files``: 62 MB of tracebacks in 35 s was
measured. ``RepeatFilter`` lets the first such record through, drops the next ones of the same
kind for ``every_s`` seconds, and appends how many were dropped to the next one it lets
through. Every other record passes untouched.

    install(logging.getLogger())   # on the root logger's handlers: catches records of any logger
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

DEFAULT_EVERY_S = 10.0
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
MESSAGES = ("out of system resource", "Too many open files")


def resource_kind(record: logging.LogRecord) -> str | None:
    """The kind of resource-exhaustion record this is (its limiting key), or None."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return f"errno {exc.errno}"
    message = record.getMessage()
    for needle in MESSAGES:
        if needle in message:
            return needle
    return None


class RepeatFilter(logging.Filter):
    """At most one record per kind (``kind_of``) every ``every_s`` seconds, with a count of the
    ones dropped meanwhile. Thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        every_s: float = DEFAULT_EVERY_S,
        kind_of: Callable[[logging.LogRecord], str | None] = resource_kind,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.every_s = every_s
        self.kind_of = kind_of
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self.kind_of(record)
        if kind is None:
            return True
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every_s:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar records suppressed since the last one)"
            record.args = None
        return True


def install(logger: logging.Logger, every_s: float = DEFAULT_EVERY_S) -> RepeatFilter:
    """Put one ``RepeatFilter`` on every handler of ``logger`` (handler filters see the records
    propagated from child loggers such as ``asyncio`` and ``uvicorn.error``)."""
    repeat = RepeatFilter(every_s)
    for handler in logger.handlers:
        handler.addFilter(repeat)
    return repeat
