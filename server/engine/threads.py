"""Which threads run torch's intra-op parallel regions: the engine thread (and a training job's
own thread), nobody else.

torch's CPU parallelism is OpenMP (libgomp). libgomp gives every thread that starts a parallel
region its own pool of worker threads, kept for that thread's lifetime, and once the process
holds more pool threads than CPUs it *throttles* every pool: workers stop spinning between
regions and each region waits for futex wake-ups. Measured on the 2-core build machine: a
1M-element add issued from a second thread ran in 113 µs once the main thread had run one
parallel op, 52 µs when the main thread never had (49 µs single-threaded in the main thread), and
a bf16 SmolLM2 decode step took 39 ms on the engine thread against 25 ms on the main thread;
one stream through HTTP streamed a token every 38.5 ms.

So the server keeps one long-lived parallel thread, the engine thread (``parallel()``, with
``--threads``); the main thread, the event loop's worker threads and the job runner's loop run
serially (``serial()``: one thread starts no pool), and a fine-tune job trains in a thread of its
own (``run_parallel``) whose pool goes away with it when the job ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_DEFAULT = torch.get_num_threads()  # the process's default before anyone lowered it
_count: int | None = None


def configure(threads: int | None) -> None:
    """The intra-op thread count of the parallel threads (None: torch's default for this process)."""
    global _count
    _count = threads


def count() -> int:
    return _count or _DEFAULT


def serial() -> None:
    """Run this thread's torch ops on this thread only (it never creates an OpenMP pool)."""
    torch.set_num_threads(1)


def parallel() -> None:
    """Give this thread the configured intra-op threads (the engine thread)."""
    torch.set_num_threads(count())


def run_parallel(fn: Callable[..., T], *args, name: str = "facet-compute") -> T:
    """``fn(*args)`` in a new thread with the configured intra-op threads; its OpenMP pool ends
    with it. Returns the result or raises what ``fn`` raised."""
    out: dict[str, object] = {}

    def target() -> None:
        parallel()
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[return-value]
