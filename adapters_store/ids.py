"""Adapter ids and the paths the server builds from them.

An adapter id is ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{1,9})?$`` and must not contain
``..``:

* 1 to 128 ASCII characters (letters, digits, ``.``, ``_``, ``-``), starting with a letter or digit;
  so no ``/``, ``\\``, ``:``, ``%``, NUL, whitespace, non-ASCII look-alikes, or a leading ``.``/``-``;
* optionally ``@<step>`` (1 to 9 digits) for fine-tune checkpoints: ``my-job@1200``. Only the
  job runner stores such ids: an id a client picks (``check_new_id``) has no ``@`` and is not the
  base model's name in any letter case.

Ids are matched with ``re.fullmatch`` on a ``str`` (no trailing-newline loophole). Paths are only
ever built here, from a checked id and a server-chosen version number, and the *resolved* path is
checked to lie directly inside ``<root>/adapters`` (a symlink planted there cannot redirect it).
Ids are case-sensitive; the store assumes a case-sensitive filesystem.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import Corrupt, ValidationError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{1,9})?$"
_ID_RE = re.compile(ID_PATTERN)
MAX_ID_LENGTH = 128 + 10

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME)


def is_valid_id(adapter_id: object) -> bool:
    return (
        isinstance(adapter_id, str)
        and len(adapter_id) <= MAX_ID_LENGTH
        and _ID_RE.fullmatch(adapter_id) is not None
        and ".." not in adapter_id
    )


def check_id(adapter_id: object) -> str:
    """Return the id unchanged, or raise ValidationError(where="adapter_id") (422)."""
    if not is_valid_id(adapter_id):
        raise ValidationError(
            "adapter_id",
            "invalid adapter id: 1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, "
            "no '..', optionally followed by '@<step>' (1-9 digits)",
        )
    return adapter_id  # type: ignore[return-value]


def check_new_id(adapter_id: object, base_model_name: str) -> str:
    """An id a client picks for a new adapter (uploads, fine-tune ``adapter_id``): a valid id
    without ``@`` (``<id>@<step>`` names only the checkpoints a fine-tune job stores) and not the
    base model's name in any letter case (``model`` on ``/v1`` must stay unambiguous). Raises
    ValidationError(where="adapter_id") (422)."""
    check_id(adapter_id)
    if "@" in adapter_id:  # type: ignore[operator]
        raise ValidationError(
            "adapter_id", "'@' is reserved for fine-tune checkpoint ids (<adapter_id>@<step>)"
        )
    if adapter_id.casefold() == base_model_name.casefold():  # type: ignore[union-attr]
        raise ValidationError("adapter_id", "an adapter cannot take the base model's name (in any case)")
    return adapter_id  # type: ignore[return-value]


def version_dir_name(version: int) -> str:
    return f"v{int(version)}"


def parse_version_dir(name: str) -> int | None:
    """``v12`` -> 12; anything else (``v012``, ``v``, ``x1``) -> None."""
    if len(name) < 2 or name[0] != "v" or not name[1:].isdigit() or not name[1:].isascii():
        return None
    if name[1] == "0" or len(name) > 12:
        return None
    return int(name[1:])


def adapter_dir(adapters_root: Path, adapter_id: str) -> Path:
    """``<adapters_root>/<id>``, with containment checked on the resolved path.

    ``adapters_root`` must already be resolved. Raises Corrupt if the entry resolves anywhere
    but directly inside ``adapters_root`` (e.g. a symlink planted in the store).
    """
    check_id(adapter_id)
    path = adapters_root / adapter_id
    resolved = path.resolve()
    if resolved.parent != adapters_root or resolved.name != adapter_id:
        raise Corrupt("adapter_id", "stored adapter path escapes the store")
    return path


def version_dir(adapters_root: Path, adapter_id: str, version: int) -> Path:
    base = adapter_dir(adapters_root, adapter_id)
    path = base / version_dir_name(version)
    resolved = path.resolve()
    if resolved.parent != adapters_root / adapter_id:
        raise Corrupt("adapter_id", "stored adapter path escapes the store")
    return path
