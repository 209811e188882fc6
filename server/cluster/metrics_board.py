"""``/metrics`` of the whole cluster: each engine replica's exposition text, with a ``replica`` label.

A deployment handle sends a call to *one* replica, so the ingress cannot ask every replica for
its metrics. Instead each replica pushes its own ``/metrics`` text every ``METRICS_PUSH_S`` to
one small named actor (the board); the ingress reads the board and merges the texts: each
metric family's ``# HELP``/``# TYPE`` once, then every replica's samples with
``replica="<id>"`` added. A replica that stopped pushing (killed, scaled down) drops out after
``STALE_S``.
"""

from __future__ import annotations

import re
import time

import ray

METRICS_PUSH_S = 2.0
STALE_S = 4 * METRICS_PUSH_S
BOARD_NAME = "facet-metrics-board"
BOARD_NAMESPACE = "facet"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)$")


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self):
        self._texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.time(), text)

    def forget(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def current(self) -> dict[str, str]:
        now = time.time()
        return {r: text for r, (at, text) in self._texts.items() if now - at <= STALE_S}


def board():
    """The board actor (created by whoever asks first; it lives as long as the Ray cluster)."""
    return MetricsBoard.options(
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def _label(line: str, replica: str) -> str:
    """``name{a="1"} 2`` -> ``name{replica="r",a="1"} 2``."""
    match = _SAMPLE.match(line)
    if match is None:
        return line
    name, labels, rest = match.groups()
    inner = labels[1:-1] if labels else ""
    joined = f'replica="{replica}"' + ("," + inner if inner else "")
    return f"{name}{{{joined}}}{rest}"


def merge(texts: dict[str, str]) -> str:
    """One exposition text from many replicas' (``{replica: text}``), families kept together."""
    families: dict[str, dict] = {}
    for replica in sorted(texts):
        family = None
        for line in texts[replica].splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                entry = families.setdefault(family, {"head": {}, "samples": []})
                entry["head"].setdefault(line[:6], line)
            elif line.startswith("#"):
                continue
            else:
                if family is None:
                    family = line.split("{", 1)[0].split(" ", 1)[0]
                entry = families.setdefault(family, {"head": {}, "samples": []})
                entry["samples"].append(_label(line, replica))
    out: list[str] = []
    for entry in families.values():
        out.extend(entry["head"][kind] for kind in ("# HELP", "# TYPE") if kind in entry["head"])
        out.extend(entry["samples"])
    return "\n".join(out) + "\n"
