"""The S3 image store: encrypted image archives in a bucket shared by hosts.

Layout: `{prefix}/{program}/{image_id}.tar.zst.age`, each object carrying its image's creation
time and trigger as user metadata. Every method blocks on the network: the supervisor calls
them through `trio.to_thread`. boto3 is imported here only, and only when a store is built
(a configuration without [supervisor.remote] url never loads it).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from grenadine_sv.store.encryption import check_private_file
from grenadine_sv.store.images import ImageMeta, validate_image_id, validate_program_name

OBJECT_SUFFIX = ".tar.zst.age"
PART_BYTES = 16 << 20
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
_OBJECT_NAME = re.compile(r"([0-9a-f]{32})" + re.escape(OBJECT_SUFFIX))


class RemoteStoreError(Exception):
    """The object store refused or could not be reached; the message says which."""


class RemoteImageNotFound(LookupError):
    pass


@dataclass(frozen=True)
class RemoteImage:
    program: str
    id: str
    created: datetime
    trigger: str
    size: int
    key: str


@dataclass(frozen=True)
class RemoteSettingsLike:
    url: str
    endpoint: str | None
    region: str | None
    credentials_file: Path | None


def split_url(url: str) -> tuple[str, str]:
    """("bucket", "prefix") of "s3://bucket/prefix" (prefix without slashes at either end)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def read_credentials(path: Path) -> tuple[str, str, str | None]:
    """(access key id, secret key, session token) from an AWS-style credentials file's
    [default] section; the file must be 0600."""
    what = "[supervisor.remote] credentials_file"
    try:
        check_private_file(path, what)
    except Exception as exc:
        raise RemoteStoreError(str(exc)) from exc
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text())
        section = parser["default"]
        return (
            section["aws_access_key_id"],
            section["aws_secret_access_key"],
            section.get("aws_session_token"),
        )
    except (configparser.Error, KeyError, OSError) as exc:
        raise RemoteStoreError(
            f"{what} {path} must have a [default] section with aws_access_key_id and "
            f"aws_secret_access_key ({exc})"
        ) from exc


class RemoteStore:
    def __init__(self, settings: RemoteSettingsLike) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.url = settings.url
        self.bucket, self.prefix = split_url(settings.url)
        credentials: dict[str, Any] = {}
        if settings.credentials_file is not None:
            key_id, secret, token = read_credentials(settings.credentials_file)
            credentials = {
                "aws_access_key_id": key_id,
                "aws_secret_access_key": secret,
                "aws_session_token": token,
            }
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=settings.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=BotoConfig(
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                read_timeout=READ_TIMEOUT_SECONDS,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
            **credentials,
        )
        from boto3.s3.transfer import TransferConfig

        self._transfer = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=2
        )

    def key(self, program: str, image_id: str) -> str:
        name = f"{validate_program_name(program)}/{validate_image_id(image_id)}{OBJECT_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, program: str, image_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(program, image_id)}"

    def upload(self, image: ImageMeta, source: BinaryIO) -> None:
        """Store the archive read from `source` as `image`'s object (replacing it)."""
        metadata = {"created": image.created.isoformat(), "trigger": image.trigger}
        self._call(
            f"upload to {self.where(image.program, image.id)}",
            lambda: self._client.upload_fileobj(
                source,
                self.bucket,
                self.key(image.program, image.id),
                ExtraArgs={"Metadata": metadata},
                Config=self._transfer,
            ),
        )

    def download(self, image: RemoteImage, sink: BinaryIO) -> None:
        self._call(
            f"download of s3://{self.bucket}/{image.key}",
            lambda: self._client.download_fileobj(
                self.bucket, image.key, sink, Config=self._transfer
            ),
        )

    def delete(self, image: RemoteImage) -> None:
        self._call(
            f"delete of s3://{self.bucket}/{image.key}",
            lambda: self._client.delete_object(Bucket=self.bucket, Key=image.key),
        )

    def programs(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = self._call(
            f"listing of s3://{self.bucket}/{prefix}",
            lambda: list(
                self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, Delimiter="/"
                )
            ),
        )
        names = {
            entry["Prefix"][len(prefix) :].rstrip("/")
            for page in pages
            for entry in page.get("CommonPrefixes", [])
        }
        return sorted(names)

    def list(self, program: str) -> list[RemoteImage]:
        """The program's images in the store, newest first."""
        prefix = self.key(program, "0" * 32).rsplit("/", 1)[0] + "/"
        pages = self._call(
            f"listing of s3://{self.bucket}/{prefix}",
            lambda: list(
                self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix
                )
            ),
        )
        images = []
        for page in pages:
            for entry in page.get("Contents", []):
                found = _OBJECT_NAME.fullmatch(entry["Key"][len(prefix) :])
                if found is None:
                    continue
                images.append(self._describe(program, found.group(1), entry))
        images.sort(key=lambda i: (i.created, i.id), reverse=True)
        return images

    def resolve(self, program: str, ref: str) -> RemoteImage:
        """The image `ref` names: "latest", a full id, or a unique id prefix (4+ characters)."""
        images = self.list(program)
        if not images:
            raise RemoteImageNotFound(f"program {program!r} has no images in {self.url}")
        if ref == "latest":
            return images[0]
        matches = [i for i in images if len(ref) >= 4 and i.id.startswith(ref)]
        if len(matches) != 1:
            raise RemoteImageNotFound(
                f"program {program!r} has {'no' if not matches else 'more than one'} image "
                f"{ref!r} in {self.url} (see grenadine-sv images --remote {program})"
            )
        return matches[0]

    def _describe(self, program: str, image_id: str, entry: dict[str, Any]) -> RemoteImage:
        head = self._call(
            f"head of s3://{self.bucket}/{entry['Key']}",
            lambda: self._client.head_object(Bucket=self.bucket, Key=entry["Key"]),
        )
        metadata = head.get("Metadata", {})
        created: datetime = entry["LastModified"]
        with contextlib.suppress(KeyError, ValueError):
            created = datetime.fromisoformat(metadata["created"])
        return RemoteImage(
            program=program,
            id=image_id,
            created=created.astimezone(UTC),
            trigger=metadata.get("trigger", "unknown"),
            size=int(entry["Size"]),
            key=entry["Key"],
        )

    def _call(self, what: str, action: Callable[[], Any]) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return action()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise RemoteStoreError(
                f"{what} refused by the object store: {error.get('Code')} {error.get('Message')}"
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise RemoteStoreError(f"{what} failed: {exc}") from exc
