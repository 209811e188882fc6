"""The factory test replicas build their app with: the tiny random-weight Llama of tests/api."""

from __future__ import annotations

from server.settings import Settings
from tests.api.tiny_server import create_tiny_app


def tiny_app(settings: Settings):
    return create_tiny_app(settings)
