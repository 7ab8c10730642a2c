"""The artifact store against the real S3 server (embedded SeaweedFS, or the configured one)."""

from __future__ import annotations

import hashlib
import os

import pytest
from boto3.s3.transfer import TransferConfig

from elmreg.registry.artifacts import ArtifactCache, S3ArtifactRepository, sha256_file
from elmreg.registry.artifacts import s3 as s3_module
from elmreg.registry.entities import StoredArtifact
from elmreg.registry.errors import ArtifactIntegrityError, ArtifactNotFoundError, CredentialsError


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_round_trip_is_content_addressed_and_verified(artifacts, tmp_path):
    data = os.urandom(100_000)
    stored = artifacts.put_file(_write(tmp_path / "w.safetensors", data))
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert stored.uri.endswith(f"/blobs/sha256/{stored.sha256[:2]}/{stored.sha256}.safetensors")
    assert artifacts.exists(stored.uri)
    # Same bytes from another file: same object, not a second copy.
    assert artifacts.put_file(_write(tmp_path / "copy.bin", data)) == stored
    out = artifacts.download(stored, tmp_path / "down" / "w.safetensors")
    assert out.read_bytes() == data
    assert stored.uri in {obj.uri for obj in artifacts.list_objects()}


def test_tampered_object_is_refused(artifacts, tmp_path):
    stored = artifacts.put_file(_write(tmp_path / "a.bin", b"original weights" * 1000))
    _, key = s3_module.parse_s3_uri(stored.uri)
    # Someone overwrites the object behind the catalogue's back, keeping the size.
    artifacts.client.put_object(Bucket=artifacts.bucket, Key=key, Body=b"tampered weights" * 1000)
    destination = tmp_path / "out.bin"
    with pytest.raises(ArtifactIntegrityError, match="does not match the catalogue"):
        artifacts.download(stored, destination)
    assert not destination.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".part-")] == []


def test_missing_object(artifacts, tmp_path):
    ghost = StoredArtifact(f"s3://{artifacts.bucket}/blobs/sha256/00/{'0' * 64}.safetensors", "0" * 64, 10)
    assert not artifacts.exists(ghost.uri)
    with pytest.raises(ArtifactNotFoundError, match="missing"):
        artifacts.download(ghost, tmp_path / "x")


def test_wrong_credentials_are_rejected(registry, tmp_path):
    endpoints = registry.endpoints
    intruder = S3ArtifactRepository(
        bucket=endpoints.s3_bucket,
        endpoint_url=endpoints.s3_endpoint_url,
        access_key_id="not-a-key",
        secret_access_key="not-a-secret",
        region=endpoints.s3_region,
    )
    with pytest.raises(CredentialsError, match="rejected the credentials"):
        intruder.put_file(_write(tmp_path / "x.bin", b"x"))
    wrong_secret = S3ArtifactRepository(
        bucket=endpoints.s3_bucket,
        endpoint_url=endpoints.s3_endpoint_url,
        access_key_id=endpoints.s3_access_key_id,
        secret_access_key="wrong",
        region=endpoints.s3_region,
    )
    with pytest.raises(CredentialsError, match="rejected the credentials"):
        wrong_secret.exists(f"s3://{endpoints.s3_bucket}/blobs/x")
    with pytest.raises(CredentialsError, match="rejected the credentials"):
        list(wrong_secret.list_objects())


def test_multipart_upload_of_a_large_file(artifacts, tmp_path, monkeypatch):
    # Parts of 5 MiB (S3's minimum) so a 12 MiB file goes up in three parts without a slow test.
    monkeypatch.setattr(
        s3_module,
        "_TRANSFER",
        TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024),
    )
    data = os.urandom(12 * 1024 * 1024)
    stored = artifacts.put_file(_write(tmp_path / "big.safetensors", data))
    _, key = s3_module.parse_s3_uri(stored.uri)
    head = artifacts.client.head_object(Bucket=artifacts.bucket, Key=key)
    assert "-3" in head["ETag"]  # multipart ETags end in -<number of parts>
    assert artifacts.download(stored, tmp_path / "big.out").read_bytes() == data


def test_cache_reuses_verified_copy_and_refetches_a_damaged_one(artifacts, tmp_path):
    stored = artifacts.put_file(_write(tmp_path / "c.bin", os.urandom(5000)))
    cache = ArtifactCache(tmp_path / "cache", artifacts)
    path = cache.fetch(stored)
    mtime = path.stat().st_mtime_ns
    assert cache.fetch(stored) == path and path.stat().st_mtime_ns == mtime  # no second download
    path.write_bytes(b"corrupted on disk")
    assert sha256_file(cache.fetch(stored))[0] == stored.sha256
