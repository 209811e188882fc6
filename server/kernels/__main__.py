"""``python -m server.kernels [BUILD_ROOT]``: build the CPU kernels ahead of time (``make model``).

Exits 1 when they cannot be built here (the server then serves with the torch code).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from server.kernels import load
from server.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
root = Path(sys.argv[1]) if len(sys.argv) > 1 else Settings().kernels_build_dir
sys.exit(0 if load(root) is not None else 1)
