"""Uploaded training files (``POST /files``), referenced by fine-tune jobs as ``training_file``.

One folder (``<data_dir>/files``) with two files per upload, both written atomically (temp file,
fsync, rename, fsync dir)::

    file-<hex>.jsonl   the bytes as uploaded
    file-<hex>.json    {"id", "object": "file", "bytes", "created_at", "filename", "purpose",
                        "records"}: written last, so a file is listed only once it is whole

An upload is checked before anything is written: UTF-8, and every line a valid record
(``server.jobs.data.parse_jsonl``; the error names the line). Tokenization is checked when a job
uses the file. Opening the folder removes leftovers of an interrupted upload.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

from adapters_store.fsutil import replace_durable

from .data import DataError, parse_jsonl

PURPOSES = ("fine-tune",)
_ID = re.compile(r"file-[0-9a-f]{24}")


class FileInvalid(ValueError):
    """The upload is not acceptable; ``where`` names the form field (API: 422)."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(f"{where}: {message}")


class FileNotFound(KeyError):
    pass


class FileStore:
    def __init__(self, root: Path | str, *, max_records: int = 100_000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self._lock = threading.Lock()
        for path in self.root.iterdir():  # leftovers: temp files, data without its metadata
            whole = path.suffix == ".jsonl" and path.with_suffix(".json").exists()
            if path.is_file() and not path.is_symlink() and path.suffix != ".json" and not whole:
                path.unlink()

    def _path(self, file_id: str, suffix: str) -> Path:
        if not _ID.fullmatch(file_id):
            raise FileNotFound(file_id)
        return self.root / f"{file_id}{suffix}"

    def put(self, filename: str, purpose: str, data: bytes) -> dict:
        """Check and store an upload; returns its file object. Raises ``FileInvalid``."""
        if purpose not in PURPOSES:
            raise FileInvalid("purpose", f"unknown purpose; must be one of {list(PURPOSES)}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileInvalid("file", f"not UTF-8 text (byte {e.start})") from None
        try:
            records = parse_jsonl(text, max_records=self.max_records)
        except DataError as e:
            raise FileInvalid("file", str(e)) from None
        file_id = "file-" + uuid.uuid4().hex[:24]
        info = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename[:256],
            "purpose": purpose,
            "records": len(records),
        }
        with self._lock:
            replace_durable(self._path(file_id, ".jsonl"), data)
            replace_durable(self._path(file_id, ".json"), json.dumps(info).encode())
        return info

    def get(self, file_id: str) -> dict:
        try:
            return json.loads(self._path(file_id, ".json").read_bytes())
        except FileNotFoundError:
            raise FileNotFound(file_id) from None

    def text(self, file_id: str) -> str:
        self.get(file_id)
        return self._path(file_id, ".jsonl").read_text(encoding="utf-8")

    def list(self) -> list[dict]:
        """Every file, newest first."""
        infos = []
        for path in self.root.glob("file-*.json"):
            try:
                infos.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                continue  # deleted meanwhile
        return sorted(infos, key=lambda i: (i["created_at"], i["id"]), reverse=True)

    def delete(self, file_id: str) -> dict:
        with self._lock:
            info = self.get(file_id)
            self._path(file_id, ".json").unlink()  # unlisted first, then the data
            self._path(file_id, ".jsonl").unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True, "filename": info["filename"]}
