"""Facts read back from a real CRIU dump of a small process tree, and that dump in the store."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grenadine_sv.criu.facts import PAGE_SIZE, ImageFactsError, read_dump_facts
from grenadine_sv.sandbox.linux import read_start_time
from grenadine_sv.store.images import DumpIntent, ImageStore, current_boot_id

pytestmark = [
    pytest.mark.criu,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps need root"),
]

CRIU_CANDIDATES = (Path("/usr/local/sbin/criu"), Path("/tmp/aptsrc/src/criu-4.2.1/criu/criu"))
MIB = 1 << 20

# The root keeps 4 MiB of touched memory, its child 32 MiB more: memory_bytes counts both only
# if every process of the tree is summed. Each reports on stdout once its memory is in place.
TREE_SCRIPT = """
import os, sys, time
ballast = bytes(range(256)) * (4 << 12)
child = os.fork()
if child == 0:
    more = bytes(range(256)) * (32 << 12)
    print("child", os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
print("root", os.getpid(), flush=True)
print("on stderr", file=sys.stderr, flush=True)
time.sleep(120)
"""


@dataclass
class DumpedTree:
    root_pid: int
    comm: str
    stdout_inode: int
    stderr_inode: int


def find_criu() -> Path | None:
    return next((path for path in CRIU_CANDIDATES if os.access(path, os.X_OK)), None)


@pytest.fixture
def criu() -> Path:
    pytest.importorskip("pycriu")
    path = find_criu()
    if path is None:
        pytest.skip(f"no CRIU binary at {' or '.join(map(str, CRIU_CANDIDATES))}")
    return path


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="grenadine-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def tree() -> Iterator[DumpedTree]:
    """A running root process with one child, whose stdout and stderr are pipes."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE_SCRIPT],
        stdin=subprocess.DEVNULL,
        stdout=out_write,
        stderr=err_write,
        start_new_session=True,
    )
    os.close(out_write)
    os.close(err_write)
    child_pid: int | None = None
    try:
        lines = dict(line.split() for line in read_lines(out_read, count=2, timeout=10.0))
        child_pid = int(lines["child"])
        assert int(lines["root"]) == proc.pid
        yield DumpedTree(
            root_pid=proc.pid,
            comm=Path(f"/proc/{proc.pid}/comm").read_text().strip(),
            stdout_inode=os.fstat(out_read).st_ino,
            stderr_inode=os.fstat(err_read).st_ino,
        )
    finally:
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)
        os.close(out_read)
        os.close(err_read)


def read_lines(fd: int, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    data = b""
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the process wrote only {data!r} in {timeout}s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"the process closed its output after {data!r}")
            data += chunk
    return data.decode().splitlines()


def dump(criu: Path, pid: int, images_dir: Path) -> None:
    command = [str(criu), "dump", "-t", str(pid), "-D", str(images_dir), "--leave-running"]
    result = subprocess.run(
        [*command, "-o", "dump.log", "-v4"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        log_tail = (images_dir / "dump.log").read_text().splitlines()[-20:]
        pytest.fail(f"criu dump failed ({result.returncode}):\n" + "\n".join(log_tail))


def test_facts_of_a_real_dump(criu: Path, tree: DumpedTree, scratch_dir: Path) -> None:
    dump(criu, tree.root_pid, scratch_dir)

    facts = read_dump_facts(scratch_dir)

    assert facts.root_pid == tree.root_pid
    assert facts.comm == tree.comm
    assert facts.memory_bytes >= 36 * MIB
    assert facts.memory_bytes == facts.dump_stats["pages_written"] * PAGE_SIZE
    assert facts.stdio_pipes == {"stdout": tree.stdout_inode, "stderr": tree.stderr_inode}
    assert facts.dump_stats["frozen_time"] > 0
    assert facts.dump_stats["freezing_time"] >= 0
    assert os.path.exists(f"/proc/{tree.root_pid}"), "--leave-running must keep it running"


def test_a_real_dump_committed_to_the_store_is_private_and_verifies(
    criu: Path, tree: DumpedTree, scratch_dir: Path
) -> None:
    store = ImageStore(scratch_dir / "state")
    intent = DumpIntent(
        trigger="manual",
        criu_version="4.2.1",
        definition_digest="0" * 64,
        leave_running=True,
        source_pid=tree.root_pid,
        source_start_time=read_start_time(tree.root_pid),
        boot_id=current_boot_id(),
    )
    with store.begin("tree", intent) as pending:
        dump(criu, tree.root_pid, pending.criu_dir)
        meta = pending.commit(read_dump_facts(pending.criu_dir))

    assert store.resolve("tree", "latest") == meta
    assert meta.root_pid == tree.root_pid
    assert "pstree.img" in meta.checksums
    assert "dump.log" in meta.checksums
    assert meta.image_bytes >= meta.memory_bytes
    criu_files = [p for p in store.criu_dir(meta).rglob("*") if p.is_file()]
    assert criu_files
    assert {stat.S_IMODE(p.stat().st_mode) for p in criu_files} == {0o600}
    store.verify(meta)


# The root forks a child that exits at once and is never reaped: a zombie in the tree.
ZOMBIE_SCRIPT = """
import os, time
child = os.fork()
if child == 0:
    os._exit(3)
print("zombie", child, flush=True)
time.sleep(120)
"""


def test_a_zombie_has_no_memory_and_a_program_that_is_one_is_refused(
    criu: Path, scratch_dir: Path
) -> None:
    """CRIU dumps a zombie as its exit code, without a pagemap: a tree holding one (a child
    not reaped yet) is an image; a program that exited during its dump (under the init, the
    root's child is the program) is refused, saying so, rather than a missing file."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", ZOMBIE_SCRIPT],
        stdin=subprocess.DEVNULL,
        stdout=write_end,
        start_new_session=True,
    )
    os.close(write_end)
    zombie: int | None = None
    try:
        [line] = read_lines(read_end, count=1, timeout=10.0)
        zombie = int(line.split()[1])
        deadline = time.monotonic() + 10.0
        while Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, f"pid {zombie} did not become a zombie"
            time.sleep(0.01)
        dump(criu, proc.pid, scratch_dir)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        os.close(read_end)
        if zombie is not None:  # re-parented to this process if it is a child subreaper
            with contextlib.suppress(ChildProcessError):
                os.waitpid(zombie, 0)

    facts = read_dump_facts(scratch_dir)
    assert facts.root_pid == proc.pid
    assert facts.memory_bytes > 0
    assert not (scratch_dir / f"pagemap-{zombie}.img").exists()
    with pytest.raises(ImageFactsError, match=f"exited while CRIU dumped it .*pid {zombie}"):
        read_dump_facts(scratch_dir, under_init=True)
