"""The S3 image store against a real SeaweedFS: two supervisors on this machine as two hosts
(separate state_dir, control socket and ports) sharing one bucket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyrage
import pytest

from grenadine_sv.store.images import ImageMeta, ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.object_store import (  # noqa: F401 (fixtures)
    ObjectStore,
    object_store,
    weed_server,
)
from tests.integration.supervising import wait_until
from tests.integration.test_cli import SupervisorProcess

pytestmark = [pytest.mark.root, pytest.mark.criu]

REDIS = "/usr/bin/redis-server"
PREFIX = "fleet"
UPLOAD_TIMEOUT = 120.0


def redis(port: int, *words: str) -> bytes:
    """One command in RESP; the raw reply."""
    command = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(command.encode())
        reply = b""
        while not reply.endswith(b"\r\n") or (reply.startswith(b"$") and reply.count(b"\r\n") < 2):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


def redis_get(port: int, key: str) -> str | None:
    reply = redis(port, "GET", key)
    if reply.startswith(b"$-1"):
        return None
    return reply.split(b"\r\n")[1].decode()


def redis_program(
    port: int, *, upload: bool, autostart: bool = True, keep: int = 5, restore: str = ""
) -> str:
    return f"""
[programs.redis]
command = ["{REDIS}", "--port", "{port}", "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no"]
ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}
autostart = {str(autostart).lower()}
{restore}

[programs.redis.checkpoint]
upload = {str(upload).lower()}
keep = {keep}
remote_keep = 2
"""


def remote_tables(
    dirs: SupervisorDirs,
    store: ObjectStore,
    identity: pyrage.x25519.Identity,
    *,
    credentials_file: bool = False,
) -> str:
    key_file = dirs.root / "age-key.txt"
    key_file.write_text(f"{identity}\n")
    os.chmod(key_file, 0o600)
    credentials = ""
    if credentials_file:
        path = dirs.root / "s3-credentials"
        path.write_text("[default]\naws_access_key_id = test\naws_secret_access_key = test\n")
        os.chmod(path, 0o600)
        credentials = f'credentials_file = "{path}"\n'
    return (
        "[supervisor.remote]\n"
        f'url = "s3://{store.bucket}/{PREFIX}"\n'
        f'endpoint = "{store.endpoint}"\n'
        'region = "us-east-1"\n'
        f"{credentials}"
        "[supervisor.remote.encryption]\n"
        f'recipients = ["{identity.to_public()}"]\n'
        f'identity_file = "{key_file}"\n'
    )


def configure(
    host: SupervisorProcess,
    port: int,
    store: ObjectStore,
    identity: pyrage.x25519.Identity,
    *,
    credentials_file: bool = False,
    metrics_listen: str = "",
    **program: Any,
) -> None:
    """Write `host`'s configuration: redis on `port` (redis_program's keys) and the shared
    store, its archives encrypted to `identity`."""
    host.dirs.write_config(
        redis_program(port, **program),
        extra_supervisor=remote_tables(
            host.dirs, store, identity, credentials_file=credentials_file
        ),
        metrics_listen=metrics_listen,
    )


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host A takes its credentials from the AWS environment variables (SeaweedFS without an
    identity configuration accepts any)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def make_host(prefix: str) -> SupervisorProcess:
    return SupervisorProcess(SupervisorDirs(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))))


@pytest.fixture
def hosts() -> Iterator[tuple[SupervisorProcess, SupervisorProcess]]:
    a, b = make_host("gsv-a-"), make_host("gsv-b-")
    try:
        yield a, b
    finally:
        for host in (a, b):
            host.stop()
            shutil.rmtree(host.dirs.root, ignore_errors=True)


def start_with_programs(host: SupervisorProcess) -> None:
    """Start the supervisor and wait until its programs are defined (the control socket
    answers before they are added)."""
    host.start()
    wait_until(lambda: "redis" in host.status(), 60, "redis defined")


def queue_length(host: SupervisorProcess) -> int:
    return len(queued(host))


def queued(host: SupervisorProcess) -> set[str]:
    """Ids of the images in the host's upload queue."""
    path = host.dirs.state_dir / "upload-queue.json"
    entries = json.loads(path.read_text())["uploads"] if path.exists() else []
    return {entry["image_id"] for entry in entries}


def uploaded(host: SupervisorProcess) -> set[str]:
    """Ids of the images the host's supervisor logged as uploaded."""
    ids = set()
    for line in host.log().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "upload_done":
                ids.add(event["image_id"])
    return ids


def uploaded_images(host: SupervisorProcess) -> list[ImageMeta]:
    """What the host uploaded, from its images (an upload pins an image until it is done)."""
    done = uploaded(host)
    return [image for image in ImageStore(host.dirs.state_dir).list("redis") if image.id in done]


def object_key(image_id: str) -> str:
    return f"{PREFIX}/redis/{image_id}.tar.zst.age"


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


def paths_used_by(pid: int) -> list[str]:
    """Everything a process has open or mapped, its cwd and root, and its mounts."""
    used = [os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/root")]
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            used.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            used.append(fields[5])
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        used.extend([fields[3], fields[4]])  # root within its filesystem, mount point
    return used


def mount_root(pid: int, mount_point: str) -> str:
    """The directory (within its filesystem) mounted at `mount_point` for the process."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mount_point:
            return fields[3]
    raise AssertionError(f"nothing is mounted at {mount_point} for {pid}")


def test_host_b_restores_what_host_a_uploaded(
    object_store: ObjectStore,  # noqa: F811
    hosts: tuple[SupervisorProcess, SupervisorProcess],
    aws_env: None,
) -> None:
    a, b = hosts
    port, metrics_port = free_port(), free_port()
    identity = pyrage.x25519.Identity.generate()
    configure(
        a, port, object_store, identity, upload=True, metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    configure(b, port, object_store, identity, upload=False, autostart=False, credentials_file=True)
    a.start()
    a.wait_running("redis")
    key, value = f"key-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    assert redis(port, "SET", key, value) == b"+OK\r\n"
    a.cli("checkpoint", "redis")
    image = ImageStore(a.dirs.state_dir).list("redis")[0]
    wanted = f"{PREFIX}/redis/{image.id}.tar.zst.age"
    wait_until(
        lambda: wanted in object_store.object_keys(), UPLOAD_TIMEOUT, "the image is uploaded"
    )
    wait_until(lambda: queue_length(a) == 0, UPLOAD_TIMEOUT, "the upload queue is empty")
    assert metric(metrics_port, 'grenadine_uploads_total{program="redis"}') == 1.0
    assert metric(metrics_port, "grenadine_upload_queue_length") == 0.0
    stored = object_store.client().get_object(Bucket=object_store.bucket, Key=wanted)["Body"].read()
    assert stored.startswith(b"age-encryption.org/v1")
    assert value.encode() not in stored
    a.stop()
    shutil.rmtree(a.dirs.state_dir)  # host A is gone: nothing of it may be needed

    listed = b.cli("images", "--remote", "redis").stdout
    assert image.id in listed
    # What a supervisor killed in the middle of a remote restore leaves behind.
    crashed_download = b.dirs.state_dir / "downloads" / f"{image.id}.partial"
    crashed_download.parent.mkdir(parents=True)
    crashed_download.write_bytes(b"half an archive")
    crashed_import = b.dirs.state_dir / "images" / "redis" / f".partial-{image.id}" / "criu"
    crashed_import.mkdir(parents=True)
    (crashed_import / "pages-1.img").write_bytes(b"half a file")
    start_with_programs(b)
    assert not crashed_download.exists()
    assert not crashed_import.parent.exists()
    restored = b.cli("restore", "redis", "remote:latest")
    assert f"restored from {image.id[:12]}" in restored.stdout
    pid = b.wait_running("redis")["redis"]
    assert redis_get(port, key) == value
    assert ImageStore(b.dirs.state_dir).list("redis")[0].id == image.id
    # Mount roots are paths within their filesystem: with /tmp a tmpfs (Debian 13) they
    # lack the /tmp prefix, so A's files are looked for by A's directory's unique name.
    leaked = [path for path in paths_used_by(pid) if a.dirs.root.name in path]
    assert leaked == [], f"host B's redis uses host A's files: {leaked}"
    tmp_source = mount_root(pid, "/tmp")
    assert tmp_source.endswith(f"{b.dirs.root.name}/state/tmp/redis"), tmp_source


def test_store_down_uploads_wait_survive_a_restart_and_complete(
    object_store: ObjectStore,  # noqa: F811
    hosts: tuple[SupervisorProcess, SupervisorProcess],
    aws_env: None,
) -> None:
    a, _ = hosts
    store = object_store
    port = free_port()
    identity = pyrage.x25519.Identity.generate()
    configure(a, port, store, identity, upload=True, keep=1)
    store.stop()
    a.start()
    a.wait_running("redis")
    a.cli("checkpoint", "redis")
    a.cli("checkpoint", "redis")
    local = ImageStore(a.dirs.state_dir).list("redis")
    assert len(local) == 2, "images waiting for upload were pruned (keep = 1)"
    waiting = {image.id for image in local}
    assert queued(a) == waiting
    wait_until(lambda: "upload_failed" in a.log(), UPLOAD_TIMEOUT, "an upload attempt fails")

    assert a.process is not None
    a.process.kill()  # a crash: the queue is on disk, and a new supervisor takes it up
    a.process.wait()
    a.start()
    # The new supervisor takes redis back with a checkpoint, which queues a third image.
    assert waiting <= queued(a)
    store.start()
    try:
        wait_until(lambda: waiting <= uploaded(a), UPLOAD_TIMEOUT, "both images uploaded")
    except AssertionError as exc:
        failures = [line for line in a.log().splitlines() if "upload_failed" in line]
        raise AssertionError(f"{exc}; last upload failures: {failures[-2:]}") from None
    wait_until(lambda: queue_length(a) == 0, UPLOAD_TIMEOUT, "the upload queue is empty")
    # remote_keep = 2: the store holds the two newest of the images uploaded.
    newest_two = sorted(uploaded_images(a), key=lambda i: i.created, reverse=True)[:2]
    assert set(store.object_keys(f"{PREFIX}/")) == {object_key(i.id) for i in newest_two}

    a.wait_running("redis")
    a.cli("checkpoint", "redis")  # the uploaded images are not pinned now: keep = 1 applies
    remaining = {image.id for image in ImageStore(a.dirs.state_dir).list("redis")}
    assert remaining.isdisjoint(waiting)
    newest = ImageStore(a.dirs.state_dir).list("redis")[0]
    wanted = {object_key(newest.id), object_key(newest_two[0].id)}
    wait_until(
        lambda: set(store.object_keys(f"{PREFIX}/")) == wanted,
        UPLOAD_TIMEOUT,
        "remote_keep applied to the newest upload",
    )


def test_wrong_key_and_tampered_object_are_refused(
    object_store: ObjectStore,  # noqa: F811
    hosts: tuple[SupervisorProcess, SupervisorProcess],
    aws_env: None,
) -> None:
    a, b = hosts
    port = free_port()
    identity, other = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    configure(a, port, object_store, identity, upload=True)
    a.start()
    a.wait_running("redis")
    a.cli("checkpoint", "redis")
    wait_until(
        lambda: queue_length(a) == 0 and object_store.object_keys(f"{PREFIX}/"),
        UPLOAD_TIMEOUT,
        "the image is uploaded",
    )
    a.stop()

    configure(b, port, object_store, other, upload=False, autostart=False)
    start_with_programs(b)
    wrong = b.cli("restore", "redis", "remote:latest", code=1)
    assert "could not be decrypted" in wrong.stderr
    assert ImageStore(b.dirs.state_dir).list("redis") == []
    b.stop()

    (key,) = object_store.object_keys(f"{PREFIX}/")
    client = object_store.client()
    stored = client.get_object(Bucket=object_store.bucket, Key=key)
    data = bytearray(stored["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(
        Bucket=object_store.bucket, Key=key, Body=bytes(data), Metadata=stored["Metadata"]
    )
    configure(b, port, object_store, identity, upload=False, autostart=False)
    start_with_programs(b)
    tampered = b.cli("restore", "redis", "remote:latest", code=1)
    assert "failed age authentication" in tampered.stderr
    assert ImageStore(b.dirs.state_dir).list("redis") == []
    assert list((b.dirs.state_dir / "images" / "redis").iterdir()) == []


def test_restore_source_newest_prefers_a_newer_remote_image_to_a_stale_local_one(
    object_store: ObjectStore,  # noqa: F811
    hosts: tuple[SupervisorProcess, SupervisorProcess],
    aws_env: None,
) -> None:
    a, b = hosts
    port = free_port()
    identity = pyrage.x25519.Identity.generate()
    # Host B once ran the program and kept a local image of it: now stale.
    configure(b, port, object_store, identity, upload=False)
    start_with_programs(b)
    b.wait_running("redis")
    assert redis(port, "SET", "state", "stale") == b"+OK\r\n"
    b.cli("checkpoint", "redis", "--stop")
    b.stop()
    # Host A took over, changed the data and uploaded a newer image.
    configure(a, port, object_store, identity, upload=True)
    a.start()
    a.wait_running("redis")
    assert redis(port, "SET", "state", "fresh") == b"+OK\r\n"
    a.cli("checkpoint", "redis", "--stop")
    wait_until(lambda: queue_length(a) == 0, UPLOAD_TIMEOUT, "the image is uploaded")
    newer = ImageStore(a.dirs.state_dir).list("redis")[0]
    a.stop()
    # Failover to B, which starts the program from the newest image wherever it is.
    configure(
        b,
        port,
        object_store,
        identity,
        upload=False,
        restore='restore = "latest"\nrestore_source = "newest"',
    )
    start_with_programs(b)
    b.wait_running("redis")
    assert redis_get(port, "state") == "fresh"
    assert ImageStore(b.dirs.state_dir).list("redis")[0].id == newer.id


def test_a_supervisor_without_a_store_never_loads_the_s3_client(
    sv_dirs: SupervisorDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without [supervisor.remote] a supervisor that checkpoints, prunes and restores never
    imports boto3 (its imports, as `python -X importtime` lists them, go to its stderr)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    sv_dirs.write_config(
        '[programs.sleeper]\ncommand = ["/bin/sleep", "1000"]\nstartsecs = 0.2\n'
        "[programs.sleeper.checkpoint]\nkeep = 1\n"
    )
    sv = SupervisorProcess(sv_dirs)
    try:
        sv.start()
        sv.wait_running("sleeper")
        sv.cli("checkpoint", "sleeper")
        sv.cli("checkpoint", "sleeper", "--stop")
        sv.cli("restore", "sleeper", "latest")
        sv.wait_running("sleeper")
    finally:
        sv.stop()
    imports = [line for line in sv.log().splitlines() if line.startswith("import time:")]
    assert any(line.endswith(" grenadine_sv.supervisor.checkpoints") for line in imports)
    loaded = [line for line in imports if "boto" in line or "s3transfer" in line]
    assert loaded == []
