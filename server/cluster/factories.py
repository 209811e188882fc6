"""App factories an engine replica can be given (``FACET_CLUSTER_FACTORY``, ``module:function``).

A factory takes the replica's ``Settings`` and returns the Facet ASGI app. The default is the very
app ``make serve`` runs; tests pass one that builds a tiny random-weight model instead.
"""

from __future__ import annotations

from server.app import create_app
from server.settings import Settings


def facet_app(settings: Settings):
    """``create_app(settings)``: base model, store and engine built from the settings."""
    return create_app(settings)
