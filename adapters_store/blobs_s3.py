"""The S3 blob store: objects in one bucket (under an optional key prefix), through boto3.

Any S3-compatible server works through ``endpoint_url`` (MinIO, SeaweedFS, moto, Ceph, AWS).
Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a
profile, an instance role); none are stored by Facet.

Conditional create: ``put`` sends ``If-None-Match: *``, so a key that exists is never overwritten
(412 PreconditionFailed, or 409 ConditionalRequestConflict for a concurrent conditional write ->
``BlobExists``). A server that ignores the header would overwrite silently, so at open the store
probes it (two conditional puts of one scratch key); if the second one is not refused, it falls
back to *emulation*: HEAD before PUT. That is not atomic against a concurrent writer of the same
key, and is safe here only because keys carry index-allocated version numbers that are never
handed out twice: two writers never aim at one key unless the index itself is broken. The mode
in use is ``conditional_put`` ("native" or "emulated"); ``conditional="native"`` refuses to run on
a server without support instead.

Reads use a ranged GET (``bytes=0-<max>``) so an oversized object is never downloaded whole.
There is no staging on S3: a version's files are held in memory until their number is known,
then put one by one (a crash in between leaves a partial version that no row points to: an orphan
for the GC).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from .backends import BlobError, BlobExists, BlobInfo, BlobMissing, BlobUnavailable

_EXISTS_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _is_transient(exc: Exception) -> bool:
    """A connection error or timeout, or a 5xx / throttling answer (not: bad credentials)."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError)):
        return True
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return int(status or 0) >= 500 or _code(exc) in _TRANSIENT_CODES


def _remote(method):
    """Report what a retry may fix as BlobUnavailable (after botocore's own retries)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BlobError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore's exceptions, imported lazily
            if _is_transient(e):
                raise BlobUnavailable(f"S3 {method.__name__} failed ({type(e).__name__})") from e
            raise

    return wrapper


class S3BlobStore:
    single_owner = False
    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: object | None = None,
        conditional: str = "auto",
        create_bucket: bool = False,
    ):
        """``conditional``: "auto" (probe the server), "native" (require If-None-Match support) or
        "emulate" (HEAD before PUT). ``create_bucket``: create it when missing (tests, dev)."""
        if conditional not in ("auto", "native", "emulate"):
            raise ValueError("conditional must be 'auto', 'native' or 'emulate'")
        if client is None:
            import boto3  # lazily: the embedded default never imports it
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region_name or "us-east-1",
                config=Config(
                    connect_timeout=5,
                    read_timeout=60,
                    retries={"max_attempts": 4, "mode": "standard"},
                    s3={"addressing_style": "path"},
                ),
            )
        self._s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if create_bucket:
            self._ensure_bucket()
        self.conditional_put = "emulated" if conditional == "emulate" else self._probe(conditional)

    def close(self) -> None:
        close = getattr(self._s3, "close", None)
        if close is not None:
            close()

    def _ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - botocore's ClientError, imported lazily
            if _code(e) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise
            self._s3.create_bucket(Bucket=self.bucket)

    def _probe(self, conditional: str) -> str:
        """Does the server refuse a second ``If-None-Match: *`` put of one key?"""
        key = f"{self.prefix}.facet-probe/{uuid.uuid4().hex}"
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
            try:
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            except Exception as e:  # noqa: BLE001
                if _code(e) in _EXISTS_CODES:
                    return "native"
                raise
        finally:
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        if conditional == "native":
            raise BlobError("the S3 server ignores If-None-Match: * (conditional puts)")
        return "emulated"

    def _key(self, key: str) -> str:
        return self.prefix + key

    # ---- objects -----------------------------------------------------------------------------
    @_remote
    def put(self, key: str, data: bytes) -> None:
        if self.conditional_put == "emulated" and self.exists(key):
            raise BlobExists(key)
        kwargs = {"IfNoneMatch": "*"} if self.conditional_put == "native" else {}
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except Exception as e:  # noqa: BLE001
            if _code(e) in _EXISTS_CODES:
                raise BlobExists(key) from None
            raise

    @_remote
    def get(self, key: str, max_bytes: int) -> bytes:
        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes=0-{max_bytes}")
        except Exception as e:  # noqa: BLE001
            code = _code(e)
            if code in _MISSING_CODES:
                raise BlobMissing(key) from None
            if code == "InvalidRange":  # an empty object has no byte 0
                return b""
            raise
        with resp["Body"] as body:
            return body.read(max_bytes + 1)

    @_remote
    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:  # noqa: BLE001
            if _code(e) in _MISSING_CODES:
                return False
            raise
        return True

    @_remote
    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    @_remote
    def delete_prefix(self, prefix: str) -> None:
        keys = [info.key for info in self.list(prefix)] if prefix.endswith("/") else [prefix]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield BlobInfo(key, int(obj["Size"]), obj["LastModified"].timestamp())

    def local_path(self, key: str) -> Path | None:
        return None

    # ---- versions ----------------------------------------------------------------------------
    def new_stage(self) -> dict[str, bytes]:
        return {}

    def stage(self, staged: dict[str, bytes], files: Mapping[str, bytes]) -> None:
        staged.update(files)  # held in memory until the version number is known

    def publish(self, staged: dict[str, bytes], prefix: str) -> None:
        for name, data in staged.items():
            self.put(prefix + name, data)

    def discard(self, staged: dict[str, bytes]) -> None:
        staged.clear()

    def sweep_staging(self) -> int:
        return 0
