"""Object-store access (S3 API) through the ``minio`` SDK.

Keys derived from content (``content_key``) make re-runs idempotent: writing the same bytes
twice lands on the same key, and ``put_if_absent`` skips the upload altogether.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from visionloop.settings import Settings

T = TypeVar("T")

# Errors worth a retry: the server is restarting or overloaded. Anything else (no such key,
# access denied) will not change by asking again.
_RETRYABLE_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


class StorageError(RuntimeError):
    """An object-store call failed; the message names the bucket, key and setting involved."""


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(data: bytes, suffix: str = "", prefix: str = "") -> str:
    """A key that only depends on the bytes: ``ab/abcdef....jpg`` (sharded by the first byte)."""
    digest = sha256_hex(data)
    return f"{prefix}{digest[:2]}/{digest}{suffix}"


class ObjectStore:
    """The platform's S3 client: every call waits at most ``VISIONLOOP_SERVICE_TIMEOUT_S`` to
    connect and to read, and is retried ``VISIONLOOP_SERVICE_RETRIES`` times (``retries``
    overrides it), so an object store that is down or hung is reported, never waited on."""

    def __init__(
        self, settings: Settings, *, retries: int | None = None, backoff: float = 0.5
    ) -> None:
        self.settings = settings
        self.retries = settings.service_retries if retries is None else retries
        self.backoff = backoff
        timeout = settings.service_timeout_s
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            # urllib3 retries what never reached an answer (refused, reset, timed out); the
            # answers S3 gives (SlowDown, ServiceUnavailable) are retried by ``_call``.
            retries=urllib3.Retry(total=self.retries, backoff_factor=backoff, status=0, redirect=0),
            maxsize=16,
        )
        self.client = Minio(
            settings.s3_host,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )

    # --- plumbing -----------------------------------------------------------------------
    def _unavailable(self, what: str, exc: Exception) -> StorageError:
        return StorageError(
            f"{what}: the object store at {self.settings.s3_host} is unavailable (unreachable "
            f"after {self.retries + 1} attempts of at most {self.settings.service_timeout_s:g} s "
            f"each: {exc}); check VISIONLOOP_S3_ENDPOINT or run `visionloop up`"
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(
                        f"{what}: the object store at {self.settings.s3_url} rejected the "
                        f"credentials ({exc.code}); check VISIONLOOP_S3_ACCESS_KEY and "
                        "VISIONLOOP_S3_SECRET_KEY"
                    ) from exc
                if exc.code not in _RETRYABLE_S3_CODES:
                    raise StorageError(f"{what}: {exc.code}: {exc.message}") from exc
                last = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # The pool has spent its retries on this already: asking again would multiply
                # the wait, not shorten the outage.
                raise self._unavailable(what, exc) from exc
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise StorageError(
            f"{what}: the object store at {self.settings.s3_host} kept answering "
            f"{getattr(last, 'code', last)} after {self.retries + 1} attempts; it is overloaded "
            "or restarting"
        ) from last

    # --- buckets ---------------------------------------------------------------------------
    def ensure_buckets(self, buckets: list[str] | None = None) -> list[str]:
        """Create the platform's buckets that are missing; returns the ones created."""
        created = []
        for bucket in buckets or self.settings.all_buckets:
            if not self._call(
                f"check bucket {bucket}", lambda b=bucket: self.client.bucket_exists(b)
            ):
                try:
                    self._call(
                        f"create bucket {bucket}", lambda b=bucket: self.client.make_bucket(b)
                    )
                    created.append(bucket)
                except StorageError as exc:
                    # Another process won the race: that is what we wanted anyway.
                    if "BucketAlreadyOwnedByYou" not in str(
                        exc
                    ) and "BucketAlreadyExists" not in str(exc):
                        raise
        return created

    def ping(self) -> None:
        self._call("list buckets", self.client.list_buckets)

    # --- objects ---------------------------------------------------------------------------
    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        result = self._call(
            f"put s3://{bucket}/{key}",
            lambda: self.client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )
        return ObjectInfo(bucket, key, len(data), result.etag)

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._call(f"stat s3://{bucket}/{key}", lambda: self.client.stat_object(bucket, key))
        except StorageError as exc:
            if "NoSuchKey" in str(exc) or "NoSuchObject" in str(exc):
                return False
            raise
        return True

    def put_if_absent(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Upload unless the key exists; True when it wrote. Content keys make this idempotent."""
        if self.exists(bucket, key):
            return False
        self.put_bytes(bucket, key, data, content_type)
        return True

    def get_bytes(self, bucket: str, key: str) -> bytes:
        def fetch() -> bytes:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(f"get s3://{bucket}/{key}", fetch)
        except StorageError as exc:
            if "NoSuchKey" in str(exc):
                raise StorageError(f"s3://{bucket}/{key} does not exist") from exc
            raise

    def list_objects(
        self, bucket: str, prefix: str = "", recursive: bool = True
    ) -> Iterator[ObjectInfo]:
        objects = self._call(
            f"list s3://{bucket}/{prefix}",
            lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=recursive)),
        )
        for obj in objects:
            if obj.is_dir:
                continue
            yield ObjectInfo(bucket, obj.object_name, obj.size or 0, (obj.etag or "").strip('"'))

    def delete(self, bucket: str, key: str) -> None:
        self._call(f"delete s3://{bucket}/{key}", lambda: self.client.remove_object(bucket, key))

    def presigned_get_url(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        from datetime import timedelta

        return self._call(
            f"presign s3://{bucket}/{key}",
            lambda: self.client.presigned_get_object(
                bucket, key, expires=timedelta(seconds=expires_s)
            ),
        )
