"""Artifacts in any S3-compatible store (SeaweedFS, MinIO, AWS S3) through boto3."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from elmreg.registry.artifacts.base import ArtifactRepository, IncompleteUpload, StoredObject, sha256_file
from elmreg.registry.entities import StoredArtifact
from elmreg.registry.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    ConfigurationError,
    CredentialsError,
)

# Files above 64 MiB go up in 64 MiB parts, several at once: a multi-gigabyte task vector never has to be
# sent in one request, and a failed part is retried on its own.
_TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024, max_concurrency=4
)
# HEAD responses carry no body, so a refused HEAD shows only as a bare 403.
_CREDENTIAL_ERRORS = {
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING = {"404", "NoSuchKey", "NotFound"}
_SINGLE_COPY_LIMIT = 5 * 1024**3
# The file system said it has no room for the download (EFBIG: a per-process file size limit).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# An outage, 5xx answers, throttling and timeouts are retried by botocore with exponential backoff and jitter
# ("standard" mode), a bounded number of times; then the error reaches the caller as one ArtifactError and a
# job is retried later by the queue.
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise ConfigurationError(f"'{uri}' is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


class S3ArtifactRepository(ArtifactRepository):
    """Weights under ``s3://<bucket>/<prefix>blobs/sha256/<aa>/<sha256><suffix>``."""

    scheme = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    ):
        """Args:
        max_attempts: Tries per request (the first one included) before an error is raised.
        connect_timeout, read_timeout: Seconds to wait for a connection, and for each read of an answer.
        """
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self._bucket_ready = False
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region,
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Path-style works with SeaweedFS, MinIO and AWS alike; virtual-host style needs DNS for buckets.
                s3={"addressing_style": "path"},
            ),
        )

    # -- helpers -------------------------------------------------------------------------------------------
    def _error(self, exc: Exception, action: str, uri: str = "") -> Exception:
        where = f"{self.endpoint_url or 'AWS S3'}"
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _CREDENTIAL_ERRORS:
                return CredentialsError(
                    f"S3 at {where} rejected the credentials ({code}) while trying to {action}: "
                    "check ELMREG_S3_ACCESS_KEY_ID / ELMREG_S3_SECRET_ACCESS_KEY and the key's permissions"
                )
            if code in _MISSING:
                return ArtifactNotFoundError(f"object {uri or self.bucket} is missing from S3 at {where}")
            if code == "NoSuchBucket":
                return ArtifactNotFoundError(f"bucket '{self.bucket}' does not exist at {where}")
            return ArtifactError(f"S3 at {where} refused to {action}: {code} {exc}")
        return ArtifactError(
            f"cannot reach S3 at {where} to {action} (tried {self.max_attempts} times): {exc}"
        )

    def uri_for(self, sha256: str, suffix: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}blobs/sha256/{sha256[:2]}/{sha256}{suffix}"

    def _key(self, uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        if bucket != self.bucket:
            raise ConfigurationError(f"{uri} is not in the configured bucket '{self.bucket}'")
        return key

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in _MISSING:
                return None
            raise self._error(exc, "read object metadata", f"s3://{self.bucket}/{key}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "read object metadata") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent). Only writes call this: a read of a mistyped
        bucket must fail, not create it."""
        if self._bucket_ready:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self._bucket_ready = True
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in _MISSING and code != "NoSuchBucket":
                raise self._error(exc, f"open bucket '{self.bucket}'") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"open bucket '{self.bucket}'") from exc
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise self._error(exc, f"create bucket '{self.bucket}'") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"create bucket '{self.bucket}'") from exc
        self._bucket_ready = True

    # -- interface -----------------------------------------------------------------------------------------
    def put_file(self, path: Path, *, suffix: str = ".safetensors") -> StoredArtifact:
        sha256, size = sha256_file(path)
        uri = self.uri_for(sha256, suffix)
        key = self._key(uri)
        self.ensure_bucket()
        head = self._head(key)
        if (
            head is not None
            and head["ContentLength"] == size
            and head.get("Metadata", {}).get("sha256") == sha256
        ):
            # The same bytes are stored already. Touch the object so that it is young again: garbage collection
            # only deletes objects older than its grace period (see registry/gc.py).
            self._touch(key, sha256, size, uri)
            head = self._head(key)
        else:
            try:
                self.client.upload_file(
                    str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}}, Config=_TRANSFER
                )
            except S3UploadFailedError as exc:
                raise self._translate_upload_failure(exc, uri) from exc
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "upload weights", uri) from exc
            head = self._head(key)
        # Verification: the catalogue may only point at an object whose size and checksum are the ones we hashed.
        if head is None or head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
            raise ArtifactError(
                f"upload of {uri} could not be verified (object missing or wrong size after upload)"
            )
        return StoredArtifact(uri=uri, sha256=sha256, size=size)

    def _touch(self, key: str, sha256: str, size: int, uri: str) -> None:
        # A copy onto itself with replaced metadata is done server side and sets Last-Modified to now; S3 refuses
        # a self-copy that changes nothing, hence REPLACE. One CopyObject takes up to 5 GiB; a larger task
        # vector goes through the transfer manager's multipart copy.
        source = {"Bucket": self.bucket, "Key": key}
        try:
            if size <= _SINGLE_COPY_LIMIT:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource=source,
                    Metadata={"sha256": sha256},
                    MetadataDirective="REPLACE",
                )
            else:
                self.client.copy(
                    source,
                    self.bucket,
                    key,
                    ExtraArgs={"Metadata": {"sha256": sha256}, "MetadataDirective": "REPLACE"},
                    Config=_TRANSFER,
                )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "refresh a stored object", uri) from exc

    def _translate_upload_failure(self, exc: S3UploadFailedError, uri: str) -> Exception:
        # boto3's transfer manager flattens the ClientError into a message; recover the error code from it.
        text = str(exc)
        for code in _CREDENTIAL_ERRORS:
            if code in text:
                return self._error(
                    ClientError({"Error": {"Code": code, "Message": text}}, "PutObject"),
                    "upload weights",
                    uri,
                )
        return ArtifactError(f"upload of {uri} failed: {text}")

    def download(self, artifact: StoredArtifact, destination: Path) -> Path:
        key = self._key(artifact.uri)
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            handle = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=".part-", delete=False)  # noqa: SIM115 - closed below, renamed on success
        except OSError as exc:
            raise self._local_error(exc, destination) from exc
        partial = Path(handle.name)
        try:
            digest, size = hashlib.sha256(), 0
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                with handle:
                    for chunk in body.iter_chunks(chunk_size=8 * 1024 * 1024):
                        digest.update(chunk)
                        size += len(chunk)
                        handle.write(chunk)
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "download weights", artifact.uri) from exc
            except OSError as exc:
                raise self._local_error(exc, destination) from exc
            if size != artifact.size or digest.hexdigest() != artifact.sha256:
                raise ArtifactIntegrityError(
                    f"{artifact.uri} does not match the catalogue (sha256 {digest.hexdigest()[:12]}…, {size} bytes;"
                    f" expected {artifact.sha256[:12]}…, {artifact.size} bytes): the object was altered or corrupted;"
                    " refusing to use it"
                )
            os.replace(partial, destination)  # atomic: a reader never sees a half-written file
            return destination
        finally:
            partial.unlink(missing_ok=True)

    @staticmethod
    def _local_error(exc: OSError, destination: Path) -> ArtifactError:
        if exc.errno in _NO_ROOM:
            return ArtifactError(
                f"no room to download weights into {destination.parent} ({exc.strerror}): free space there or "
                "set ELMREG_CACHE_DIR to a larger disk; nothing partial was kept"
            )
        return ArtifactError(
            f"cannot write downloaded weights to {destination.parent}: {exc.strerror or exc}"
        )

    def exists(self, uri: str) -> bool:
        return self._head(self._key(uri)) is not None

    def stat(self, uri: str) -> StoredObject | None:
        head = self._head(self._key(uri))
        if head is None:
            return None
        return StoredObject(uri, int(head["ContentLength"]), head["LastModified"])

    def delete(self, uri: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(uri))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "delete an object", uri) from exc

    def list_objects(self) -> Iterator[StoredObject]:
        # A read: a missing bucket is an error here (NoSuchBucket), never created.
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "blobs/"):
                for obj in page.get("Contents", []):
                    yield StoredObject(
                        f"s3://{self.bucket}/{obj['Key']}", int(obj["Size"]), obj["LastModified"]
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list objects") from exc

    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "blobs/"):
                for upload in page.get("Uploads", []):
                    yield IncompleteUpload(
                        f"s3://{self.bucket}/{upload['Key']}", upload["UploadId"], upload["Initiated"]
                    )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NotImplemented", "MethodNotAllowed"):
                raise ArtifactError(
                    f"S3 at {self.endpoint_url or 'AWS S3'} cannot list incomplete multipart uploads ({code}): "
                    "abort them with the store's own tools or a lifecycle rule (AbortIncompleteMultipartUpload)"
                ) from exc
            raise self._error(exc, "list incomplete multipart uploads") from exc
        except BotoCoreError as exc:
            raise self._error(exc, "list incomplete multipart uploads") from exc

    def abort_upload(self, upload: IncompleteUpload) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(upload.uri), UploadId=upload.upload_id
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") == "NoSuchUpload":
                return
            raise self._error(exc, "abort a multipart upload", upload.uri) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "abort a multipart upload", upload.uri) from exc
