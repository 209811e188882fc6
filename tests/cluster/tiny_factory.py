"""The factory test replicas build their app with: the tiny random-weight Llama of tests/api."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.settings import Settings
from tests.api.tiny_server import before_each_step, create_tiny_app, delay_steps

# Seconds each engine step of a test replica sleeps first (unset: none). The tiny model steps in
# about a millisecond, faster than a client's disconnect travels through the ingress to its replica.
STEP_DELAY_ENV = "TINY_REPLICA_STEP_DELAY_S"
# A file path: while that file exists, a replica whose running sequences have produced a token
# holds its engine steps until one of its requests is cancelled (at most HOLD_LIMIT_S). A test
# that disconnects a stream thereby knows the stream cannot finish before the cancel arrives.
HOLD_FILE_ENV = "TINY_REPLICA_HOLD_FILE"
HOLD_LIMIT_S = 60.0


def tiny_app(settings: Settings):
    app = create_tiny_app(settings)
    delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    app = delay_steps(app, delay) if delay > 0 else app
    hold_file = os.environ.get(HOLD_FILE_ENV)
    return hold_until_cancelled(app, Path(hold_file)) if hold_file else app


def hold_until_cancelled(app, hold_file: Path):
    """Before each engine step: while ``hold_file`` exists and a running sequence has a token,
    wait for a cancel (or HOLD_LIMIT_S)."""

    def hold(generator) -> None:
        def running() -> list:
            return [*generator._seqs, *generator._preempted]

        deadline = time.monotonic() + HOLD_LIMIT_S
        while (
            hold_file.exists()
            and any(s.generated for s in running())
            and not any(s.request.cancelled for s in running())
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)

    return before_each_step(app, hold)


def tiny_app_on_configured_store(settings: Settings):
    """The tiny app on the store ``settings.store_*`` name (S3, PostgreSQL): ``build_tiny`` opens
    the embedded store whatever the settings say."""
    import torch

    from server.app import create_app, open_store
    from server.engine.engine import Engine
    from server.engine.loader import wrap_model
    from tests.api.tiny_server import BASE_NAME, CHAT_TEMPLATE, TARGETS
    from tests.conftest import make_tiny_llama, make_tokenizer

    torch.set_num_threads(settings.threads or 1)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    base = wrap_model(BASE_NAME, make_tiny_llama(), tokenizer, TARGETS)
    store = open_store(settings, base)
    engine = Engine(
        base, settings, source=lambda key: store.load(*key), current_version=store.current_version
    )
    return create_app(settings, engine=engine, store=store)
