"""A Facet app on a tiny random-weight Llama (CPU, no files but its data dir).

    python -m tests.api.tiny_server --port 8123 --data-dir /tmp/x [--api-keys admin:k ...]

Any setting can be given as a flag (``settings_from_cli``). Tests also import ``build_tiny``
to inject the same engine and store into ``create_app``.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import uvicorn

from adapters_store.store import AdapterStore
from server.app import create_app, store_limits
from server.engine.engine import Engine
from server.engine.loader import wrap_model
from server.settings import Settings, settings_from_cli
from tests.conftest import make_tiny_llama, make_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAME = "tiny-llama"
# The in-memory tokenizer has no chat template: a plain one (contents joined by spaces).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
DEFAULTS = {
    "dtype": "float32",  # the tiny model is built in float32; pinned so `auto` never differs by CPU
    "threads": 1,
    "max_batch_size": 8,
    "device_adapter_bytes": 64 << 20,
    "host_adapter_bytes": 64 << 20,
    "kv_cache_bytes": 16 << 20,  # 64k tokens of the tiny model: plenty, and small for many apps per run
}


def tiny_settings(**overrides) -> Settings:
    return Settings(**{**DEFAULTS, **overrides})


def build_tiny(settings: Settings) -> tuple[Engine, AdapterStore]:
    if settings.threads:  # as load_base_model does (tiny ops are much slower on several threads)
        torch.set_num_threads(settings.threads)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    base = wrap_model(BASE_NAME, make_tiny_llama(), tokenizer, TARGETS)
    store = AdapterStore(
        settings.data_dir / "adapters", base.module_shapes, base.name, store_limits(settings)
    )
    engine = Engine(
        base, settings, source=lambda key: store.load(*key), current_version=store.current_version
    )
    return engine, store


def create_tiny_app(settings: Settings):
    engine, store = build_tiny(settings)
    return create_app(settings, engine=engine, store=store)


def before_each_step(app, hook):
    """Call ``hook(generator)`` before every engine step of ``app``. Returns ``app``."""
    generator = app.state.runtime.engine.generator
    step = generator.step

    def hooked_step():
        hook(generator)
        return step()

    generator.step = hooked_step
    return app


def delay_steps(app, seconds: float):
    """Make every engine step of ``app`` sleep ``seconds`` first (the tiny model steps in about a
    millisecond: tests that must act between two tokens slow it down). Returns ``app``."""
    return before_each_step(app, lambda _generator: time.sleep(seconds))


STEP_DELAY_ENV = "TINY_SERVER_STEP_DELAY_S"  # seconds every engine step sleeps first (default 0)


def main(argv: list[str] | None = None) -> None:
    cli = settings_from_cli(argv)
    settings = tiny_settings(**cli.model_dump(exclude_unset=True))
    app = create_tiny_app(settings)
    delay = float(os.environ.get(STEP_DELAY_ENV, "0"))
    if delay > 0:
        app = delay_steps(app, delay)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
