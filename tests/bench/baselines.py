"""The baselines grenadine-sv is measured against: CRIU run by hand, and the disk itself."""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from grenadine_sv.criu.client import error_lines
from grenadine_sv.criu.facts import read_dump_facts
from tests.bench.procs import BenchError

MIB = 1 << 20
DUMP_TIMEOUT = 600.0


def settle_disk() -> None:
    """Write back every dirty page, so that the next measurement does not pay for the last one's
    writes (untimed, before each measured run)."""
    os.sync()


@dataclass(frozen=True)
class RawDump:
    seconds: float
    """`criu dump` from start to exit."""
    fsync_seconds: float
    """Making its files durable afterwards (fsync each file and the directory)."""
    image_bytes: int
    stats: dict[str, int]
    """CRIU's stats-dump: times in microseconds, counts in pages."""


def raw_criu_dump(criu: Path, pid: int, images_dir: Path) -> RawDump:
    """`criu dump` by hand with the options grenadine-sv gives CRIU through its RPC: the tree
    of `pid`, external mounts, left running, file locks (checkpoint.file_locks' default), log
    level 4, log in the image directory."""
    images_dir.mkdir(mode=0o700)
    argv = [
        str(criu),
        "dump",
        "--tree",
        str(pid),
        "--images-dir",
        str(images_dir),
        "--external",
        "mnt[]",
        "--leave-running",
        "--file-locks",
        "-v4",
        "--log-file",
        "dump.log",
    ]
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=DUMP_TIMEOUT, check=False)
    seconds = time.monotonic() - began
    if result.returncode != 0:
        errors = "; ".join(error_lines(images_dir / "dump.log")) or result.stderr.decode()
        raise BenchError(f"criu dump of pid {pid} failed: {errors}")
    began = time.monotonic()
    image_bytes = fsync_tree(images_dir)
    fsync_seconds = time.monotonic() - began
    stats = dict(read_dump_facts(images_dir).dump_stats)
    return RawDump(seconds, fsync_seconds, image_bytes, stats)


def fsync_tree(top: Path) -> int:
    """fsync every file under `top` and the directories; the bytes the files hold."""
    total = 0
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                total += os.fstat(fd).st_size
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total


@dataclass(frozen=True)
class DiskWrite:
    seconds: float
    written_bytes: int

    @property
    def bytes_per_second(self) -> float:
        return self.written_bytes / self.seconds


def dd_write(path: Path, size_bytes: int) -> DiskWrite:
    """A sequential write of at least `size_bytes` with `dd ... conv=fdatasync` (durable at
    exit), timed from start to exit; the file is removed afterwards."""
    count = max(1, math.ceil(size_bytes / MIB))
    argv = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fdatasync"]
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=DUMP_TIMEOUT, check=False)
    seconds = time.monotonic() - began
    path.unlink(missing_ok=True)
    if result.returncode != 0:
        raise BenchError(f"dd to {path} failed: {result.stderr.decode().strip()}")
    return DiskWrite(seconds, count * MIB)
