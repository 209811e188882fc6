"""Uploaded training files (``POST /files``), referenced by fine-tune jobs as ``training_file``.

Stored like adapters (``adapters_store.objects``), in the same blob store and next to the same
index, so every replica sharing the store sees every file:

* the bytes as uploaded: one immutable object ``files/<file id>.jsonl`` (local files under the
  store root, or S3), written with a conditional create;
* the file object: one row of ``training_files`` (``{"id", "object": "file", "bytes",
  "created_at", "filename", "purpose", "records"}`` and the object's sha256), in SQLite
  (``<data_dir>/files/files.sqlite3``, the default) or in the adapter index's PostgreSQL. The row
  commits after the object, so a file is listed only once it is whole;
* a delete moves the row to ``training_file_tombstones`` (one transaction) and then removes the
  object; an object no row points to (a crashed upload, a delete cut short) is collected at open
  once older than the store's orphan grace period.

Reads check the object against the row's sha256 (a remote store reads through the replica's
bounded cache): a damaged file is ``Corrupt`` (409), never served. An upload is checked before
anything is written: UTF-8, and every line a valid record (``server.jobs.data.parse_jsonl``; the
error names the line). Tokenization is checked when a job uses the file. Files of the earlier
layout (``<root>/file-<hex>.jsonl`` + ``.json``) are moved into the store at open.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from adapters_store import objects as store_objects
from adapters_store.blobs_local import LocalBlobStore
from adapters_store.errors import Conflict
from adapters_store.objects import ObjectStore, collect_orphans
from adapters_store.sqldb import open_db

from .data import DataError, parse_jsonl

PURPOSES = ("fine-tune",)
_ID = re.compile(r"file-[0-9a-f]{24}")
PREFIX = "files/"
_PUBLIC = ("id", "bytes", "created_at", "filename", "purpose", "records")

SCHEMA = """
CREATE TABLE IF NOT EXISTS training_files (
    id TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    records INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS training_file_tombstones (
    id TEXT PRIMARY KEY,
    deleted_at REAL NOT NULL
);
"""


class FileInvalid(ValueError):
    """The upload is not acceptable; ``where`` names the form field (API: 422)."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(f"{where}: {message}")


class FileNotFound(KeyError):
    pass


def object_key(file_id: str) -> str:
    return f"{PREFIX}{file_id}.jsonl"


def _owner(key: str) -> str | None:
    name = key[len(PREFIX) :]
    return name.removesuffix(".jsonl") if _ID.fullmatch(name.removesuffix(".jsonl")) else None


def _info(row: dict) -> dict:
    return {"id": row["id"], "object": "file", **{k: row[k] for k in _PUBLIC if k != "id"}}


class FileStore:
    def __init__(
        self,
        root: Path | str,
        *,
        objects: ObjectStore | None = None,
        index_url: str | None = None,
        orphan_grace_s: float | None = None,
        max_records: int = 100_000,
    ):
        """``objects``: the blob store to keep files in (the adapter store's, from the runtime);
        by default local files under ``root``. ``index_url``: ``None``/``"sqlite"`` for
        ``root/files.sqlite3``, or the adapter index's ``postgresql://`` DSN. ``orphan_grace_s``:
        how old an object no row points to must be before it is removed (default 0 for a
        single-owner store, 15 minutes for a shared one)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects = objects if objects is not None else ObjectStore(LocalBlobStore(self.root))
        self.max_records = max_records
        self.db = open_db(index_url, self.root / "files.sqlite3")
        self.db.create(SCHEMA, "facet-training-files")
        self._import_legacy()
        if orphan_grace_s is None:
            orphan_grace_s = 900.0 if self.objects.shared else 0.0
        self.gc(orphan_grace_s)

    def close(self) -> None:
        self.db.close()

    # ---- writes ------------------------------------------------------------------------------
    def put(self, filename: str, purpose: str, data: bytes) -> dict:
        """Check and store an upload; returns its file object. Raises ``FileInvalid``."""
        records = self._check(purpose, data)
        info = {
            "id": "file-" + uuid.uuid4().hex[:24],
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename[:256],
            "purpose": purpose,
            "records": len(records),
        }
        self._store(info, data)
        return info

    def _check(self, purpose: str, data: bytes) -> list:
        if purpose not in PURPOSES:
            raise FileInvalid("purpose", f"unknown purpose; must be one of {list(PURPOSES)}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileInvalid("file", f"not UTF-8 text (byte {e.start})") from None
        try:
            return parse_jsonl(text, max_records=self.max_records)
        except DataError as e:
            raise FileInvalid("file", str(e)) from None

    def _store(self, info: dict, data: bytes) -> None:
        """The object first, then its row: never a row without its bytes."""
        sha = self.objects.put(object_key(info["id"]), data)
        store_objects.fault_point("file_object_written")
        with self.db.transaction(write=True) as cur:
            cur.execute(
                "INSERT INTO training_files (id, bytes, created_at, filename, purpose, records, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*(info[k] for k in _PUBLIC), sha),
            )
        store_objects.fault_point("file_committed")

    def delete(self, file_id: str) -> dict:
        """Row -> tombstone (one transaction), then the object."""
        self._check_id(file_id)
        with self.db.transaction(write=True) as cur:
            row = cur.execute("SELECT * FROM training_files WHERE id = ?", (file_id,)).fetchone()
            if row is None:
                raise FileNotFound(file_id)
            cur.execute("DELETE FROM training_files WHERE id = ?", (file_id,))
            cur.execute(
                "INSERT INTO training_file_tombstones (id, deleted_at) VALUES (?, ?)", (file_id, time.time())
            )
        self.objects.delete(object_key(file_id))
        return {"id": file_id, "object": "file", "deleted": True, "filename": row["filename"]}

    def gc(self, grace_s: float = 0.0) -> int:
        """Remove objects under ``files/`` that no row points to (older than ``grace_s``)."""

        def live(ids: set[str]) -> set[str]:
            with self.db.transaction() as cur:
                return {r["id"] for r in cur.execute("SELECT id FROM training_files").fetchall()} & ids

        return collect_orphans(self.objects, PREFIX, _owner, live, grace_s)

    # ---- reads -------------------------------------------------------------------------------
    def _check_id(self, file_id: str) -> None:
        if not _ID.fullmatch(file_id):
            raise FileNotFound(file_id)

    def _row(self, file_id: str) -> dict:
        self._check_id(file_id)
        with self.db.transaction() as cur:
            row = cur.execute("SELECT * FROM training_files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise FileNotFound(file_id)
        return row

    def get(self, file_id: str) -> dict:
        return _info(self._row(file_id))

    def text(self, file_id: str) -> str:
        """The file as uploaded, checked against its sha256 (``Corrupt``, 409, if it is not)."""
        row = self._row(file_id)
        data = self.objects.get(object_key(file_id), row["sha256"], row["bytes"], "file_id")
        return data.decode("utf-8")

    def list(self) -> list[dict]:
        """Every file, newest first."""
        with self.db.transaction() as cur:
            rows = cur.execute("SELECT * FROM training_files ORDER BY created_at DESC, id DESC").fetchall()
        return [_info(r) for r in rows]

    # ---- the earlier layout ------------------------------------------------------------------
    def _import_legacy(self) -> None:
        """Move ``<root>/file-<hex>.{jsonl,json}`` (the layout before the store held files) into
        the store, and remove leftovers of interrupted uploads of that layout."""
        for meta in sorted(self.root.glob("file-*.json")):
            data_path = meta.with_suffix(".jsonl")
            try:
                info = json.loads(meta.read_bytes())
                data = data_path.read_bytes()
                if info.get("id") == meta.stem and _ID.fullmatch(meta.stem):
                    self._store({k: info[k] for k in (*_PUBLIC, "object")}, data)
            except (OSError, ValueError, KeyError, Conflict):
                pass  # unreadable, or already imported by another process sharing the folder
            meta.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
        for path in self.root.glob("file-*"):
            if path.suffix in (".jsonl", ".tmp") or ".tmp" in path.name:
                path.unlink(missing_ok=True)
