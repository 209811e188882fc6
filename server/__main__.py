"""``python -m server [--host H] [--port P] [--any-setting ...]``: settings, then uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.app import create_app, on_startup_failure
from server.settings import settings_from_cli


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
            server_header=False,
            log_config=None,  # keep the basicConfig above
        )
    )
    on_startup_failure(app, lambda: setattr(server, "should_exit", True))
    server.run()
    return 1 if app.state.runtime.phase == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
