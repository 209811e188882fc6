"""Shared bits of the examples: find ``facet_client`` in this checkout when it is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import facet_client  # noqa: F401
except ImportError:  # run from a checkout without ``pip install ./clients/python``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
