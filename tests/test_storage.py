"""Object-store access against the real S3 server of the test stack."""

from __future__ import annotations

import uuid

import pytest

from cli.stack import free_port
from visionloop.settings import Settings
from visionloop.storage import ObjectStore, StorageError, content_key, sha256_hex

pytestmark = pytest.mark.stack


def test_buckets_are_ensured_at_start(settings: Settings) -> None:
    store = ObjectStore(settings)
    assert all(store.client.bucket_exists(b) for b in settings.all_buckets)
    extra = f"extra-{uuid.uuid4().hex[:8]}"
    assert store.ensure_buckets([extra]) == [extra]
    assert store.ensure_buckets([extra]) == []  # idempotent


def test_round_trip_and_idempotent_keys(settings: Settings) -> None:
    store = ObjectStore(settings)
    data = uuid.uuid4().bytes * 1000
    key = content_key(data, suffix=".bin", prefix="test/")
    assert key == f"test/{sha256_hex(data)[:2]}/{sha256_hex(data)}.bin"
    assert store.put_if_absent(settings.bucket_images, key, data) is True
    assert store.put_if_absent(settings.bucket_images, key, data) is False  # same bytes, no rewrite
    assert store.get_bytes(settings.bucket_images, key) == data
    listed = list(store.list_objects(settings.bucket_images, prefix="test/"))
    assert [(o.key, o.size) for o in listed if o.key == key] == [(key, len(data))]
    store.delete(settings.bucket_images, key)
    assert not store.exists(settings.bucket_images, key)


def test_missing_object_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(StorageError, match=r"s3://images/no/such/key does not exist"):
        ObjectStore(settings).get_bytes(settings.bucket_images, "no/such/key")


def test_wrong_credentials_name_the_settings(settings: Settings) -> None:
    bad = settings.model_copy(update={"s3_secret_key": settings.s3_secret_key.__class__("wrong")})
    with pytest.raises(StorageError, match="VISIONLOOP_S3_SECRET_KEY"):
        ObjectStore(bad, retries=0).ping()


def test_unreachable_endpoint_fails_fast_naming_the_setting(settings: Settings) -> None:
    bad = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"})
    with pytest.raises(StorageError, match="unreachable.*VISIONLOOP_S3_ENDPOINT"):
        ObjectStore(bad, retries=1, backoff=0.01).ping()
