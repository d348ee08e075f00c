"""An image's snapshot files move with it: a program holding a file of its data directory
open (checkpoint.snapshot) and one in its private /tmp is checkpointed on host A, moved to
host B by export piped into import and by the object store, and restored there, where it
sees both files as they were at the checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyrage
import pytest

from grenadine_sv.store.images import ImageStore
from tests.integration.object_store import (  # noqa: F401 (fixtures)
    ObjectStore,
    object_store,
    weed_server,
)
from tests.integration.supervising import python_program, wait_until
from tests.integration.test_cli import SupervisorProcess
from tests.integration.test_remote import (  # noqa: F401 (fixtures)
    PREFIX,
    UPLOAD_TIMEOUT,
    aws_env,
    hosts,
    queue_length,
    remote_tables,
)
from tests.integration.test_transfer import encryption_table, pipe_export_into_import

pytestmark = [pytest.mark.root, pytest.mark.criu]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The program's data directory: the same path on both hosts (one machine here)."""
    path = Path(tempfile.mkdtemp(prefix="gsv-data-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def keeper_program(data: Path, *, autostart: bool, checkpoint: str = "") -> str:
    """Makes up a value (in memory only), writes it into data/state.txt and /tmp/cache.txt
    and keeps both open (CRIU then checks their sizes at restore); at SIGUSR2 prints the
    value and what it reads from both files now."""
    code = (
        "import signal, sys, time, uuid\n"
        "value = uuid.uuid4().hex\n"
        f"state = open({str(data / 'state.txt')!r}, 'w')\n"
        "state.write(value); state.flush()\n"
        "cache = open('/tmp/cache.txt', 'w')\n"
        "cache.write('tmp-' + value); cache.flush()\n"
        "def report(*_):\n"
        f"    seen = [open(p).read() for p in ({str(data / 'state.txt')!r}, '/tmp/cache.txt')]\n"
        "    print('seen', value, *seen, flush=True)\n"
        "signal.signal(signal.SIGUSR2, report)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print('ready', value, flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    return f"""
[programs.keeper]
command = {python_program(code)}
startsecs = 0.2
autostart = {str(autostart).lower()}
binds = ["{data}"]
restore_fallback = "fail"

[programs.keeper.checkpoint]
snapshot = ["{data}"]
{checkpoint}
"""


def checkpoint_on_a(
    a: SupervisorProcess, data: Path, before_stop: Callable[[str], None] = lambda _: None
) -> tuple[str, str]:
    """Run the program on A until it wrote its files, checkpoint it (stopping it), call
    `before_stop` with the image's id, stop A, and change the data file as a later run
    would: only the snapshot can put it back. Returns the image's id and the value."""
    a.start()
    a.wait_running("keeper")
    log = a.dirs.stdout_log("keeper")
    wait_until(lambda: log.exists() and b"ready " in log.read_bytes(), 30, "the program is ready")
    value = log.read_text().split("ready ", 1)[1].split()[0]
    a.cli("checkpoint", "keeper", "--stop")
    image_id = ImageStore(a.dirs.state_dir).list("keeper")[0].id
    before_stop(image_id)
    a.stop()
    with (data / "state.txt").open("a") as state:
        state.write(" and what came after")
    return image_id, value


def check_restored_on_b(b: SupervisorProcess, data: Path, value: str) -> None:
    """The restored program has A's value in memory and sees it in both files."""
    pid = b.wait_running("keeper")["keeper"]
    assert (data / "state.txt").read_text() == value
    assert Path(f"/proc/{pid}/root/tmp/cache.txt").read_text() == f"tmp-{value}"
    os.kill(pid, signal.SIGUSR2)  # through the sandbox's init to the program
    log = b.dirs.stdout_log("keeper")
    seen = f"seen {value} {value} tmp-{value}".encode()
    wait_until(lambda: log.exists() and seen in log.read_bytes(), 30, "the program reports")


def test_export_into_import_carries_the_snapshot_files(
    hosts: tuple[SupervisorProcess, SupervisorProcess],  # noqa: F811
    data_dir: Path,
) -> None:
    a, b = hosts
    identity = pyrage.x25519.Identity.generate()
    for side, autostart in ((a, True), (b, False)):
        side.dirs.write_config(
            keeper_program(data_dir, autostart=autostart),
            extra_supervisor=encryption_table(side.dirs, identity),
        )
    image_id, value = checkpoint_on_a(a, data_dir)

    imported, _ = pipe_export_into_import(a, b, "keeper", image_id)
    assert imported.returncode == 0, imported.stderr
    b.start()
    b.cli("restore", "keeper", image_id)
    check_restored_on_b(b, data_dir, value)


def test_the_object_store_carries_the_snapshot_files(
    object_store: ObjectStore,  # noqa: F811
    hosts: tuple[SupervisorProcess, SupervisorProcess],  # noqa: F811
    aws_env: None,  # noqa: F811
    data_dir: Path,
) -> None:
    a, b = hosts
    identity = pyrage.x25519.Identity.generate()
    for side, upload in ((a, True), (b, False)):
        side.dirs.write_config(
            keeper_program(data_dir, autostart=upload, checkpoint=f"upload = {upload}".lower()),
            extra_supervisor=remote_tables(side.dirs, object_store, identity),
        )

    def uploaded(image_id: str) -> None:
        key = f"{PREFIX}/keeper/{image_id}.tar.zst.age"
        wait_until(lambda: key in object_store.object_keys(), UPLOAD_TIMEOUT, "uploaded")
        wait_until(lambda: queue_length(a) == 0, UPLOAD_TIMEOUT, "the upload queue is empty")

    image_id, value = checkpoint_on_a(a, data_dir, uploaded)

    b.start()
    restored = b.cli("restore", "keeper", "remote:latest")
    assert f"restored from {image_id[:12]}" in restored.stdout
    check_restored_on_b(b, data_dir, value)
