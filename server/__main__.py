"""``python -m server [--host H] [--port P] [--any-setting ...]``: settings, then uvicorn.

Shutdown (SIGTERM, or the first Ctrl-C) drains before uvicorn's own shutdown: ``/ready`` and new
generation/adapter requests answer 503 with ``Retry-After`` at once, ``/health`` stays 200, and
the listener stays open while the requests already in flight finish (at most
``shutdown_grace_s``). Generations still running when the grace period is spent end with an
error (503 ``the server is shutting down``, or an SSE ``error`` event), anything else still open
a second later is cancelled. Then uvicorn stops accepting, the lifespan stops the fine-tune
runner and the engine, and the process exits 0 (1 after a failed start-up). A second signal
goes to uvicorn as usual: it stops accepting at once (Ctrl-C twice forces the exit).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from types import FrameType

import uvicorn

from server import log_limit
from server.app import create_app, on_startup_failure
from server.connections import uvicorn_config
from server.engine import threads
from server.runtime import Runtime
from server.settings import settings_from_cli

log = logging.getLogger("facet.server")

# After the grace period: how long handlers get to send their error answers before uvicorn
# cancels them.
FLUSH_S = 1.0


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase between the signal and its shutdown (see the module docstring).

    Plain uvicorn closes the listening socket at once (new requests: connection refused, so
    ``/ready`` never answers 503) and re-raises the signal after its shutdown (exit status -15).
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime
        self.drain_deadline: float | None = None
        self.draining: set[asyncio.Task] | None = None  # requests in flight when the drain began

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # Signal handler: no logging here (on_tick logs), just flip the state.
        if self.runtime.phase != "failed":
            self.runtime.phase = "draining"
        self.drain_deadline = time.monotonic() + self.grace_s

    @property
    def grace_s(self) -> float:
        return float(self.config.timeout_graceful_shutdown or 0)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.draining is None:
                self.draining = set(self.server_state.tasks)
                log.info("draining %d request(s), at most %gs", len(self.draining), self.grace_s)
            self.draining = {t for t in self.draining if not t.done()}
            left = self.drain_deadline - time.monotonic()
            if not self.draining or left <= 0:
                if self.draining and self.runtime.engine is not None:
                    # Grace spent: stopping the engine ends the generations still running with
                    # an error, which their handlers answer properly (503, or an SSE error
                    # event) instead of being cut off mid-response by uvicorn's cancel.
                    log.warning("grace period spent: ending %d request(s)", len(self.draining))
                    await asyncio.to_thread(self.runtime.engine.stop)
                    left = FLUSH_S
                # uvicorn's shutdown waits for what is left (e.g. 503s answered meanwhile) for the
                # rest of the grace period, then cancels it.
                self.config.timeout_graceful_shutdown = max(0.0, left)
                self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(argv)
    threads.configure(settings.threads)
    threads.serial()  # the event loop's thread: torch parallelism is the engine thread's alone
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_limit.install(logging.getLogger())  # no flood of tracebacks when descriptors run out
    app = create_app(settings)
    app.state.runtime.freeze_gc_when_ready = True
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    on_startup_failure(app, lambda: setattr(server, "should_exit", True))
    server.run()
    return 1 if app.state.runtime.phase == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
