"""Sealing an image: every file hashed (BLAKE3) and made durable (fsync) once CRIU has exited.

Nothing of it runs while CRIU dumps: hashing the files from the page cache as CRIU wrote them
made CRIU's own writing of the pages slower under the freeze (1 GiB on this project's VM:
CRIU's memwrite_time 0.54 s against 0.30 s, frozen time 1.38x raw CRIU's), and write-back under
the dump more so. After CRIU exits, each file is hashed (on every core, from the page cache:
no disk read) while its fsync, which has to wait for the disk anyway, runs beside it.

Older images carry SHA-256 digests; `digest_of` still computes those for `verify`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import blake3

from grenadine_sv.store.durable import DIR_MODE, FILE_MODE, fsync_dir

ChecksumAlgorithm = Literal["sha256", "blake3"]
NEW_IMAGE_ALGORITHM: ChecksumAlgorithm = "blake3"

# Threads that seal an image: fsyncs wait on the disk while hashes use the CPUs.
SEAL_WORKERS = 4


@dataclass(frozen=True)
class FileRecord:
    """One file of a sealed image: its size and its digest."""

    size: int
    digest: str


_NOT_REGULAR = (
    "cannot store {path} in an image ({why}): an image holds only regular files "
    "(incremental dumps with a parent link are not supported)"
)


def open_regular(path: Path) -> int:
    """An O_RDONLY fd of `path`, which must be a regular file (no symlink followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(_NOT_REGULAR.format(path=path, why=exc.strerror)) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(_NOT_REGULAR.format(path=path, why="not a regular file"))
    return fd


def blake3_of_fd(fd: int) -> str:
    """BLAKE3 of the whole file on every core, straight from the page cache (mmap: no copy)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = os.fstat(fd).st_size
    if size:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
            hasher.update(mapped)
    return hasher.hexdigest()


def digest_of(path: Path, algorithm: ChecksumAlgorithm) -> str:
    """The digest of a file as `verify` checks it (BLAKE3 on every core, or SHA-256)."""
    fd = open_regular(path)
    try:
        if algorithm == "blake3":
            return blake3_of_fd(fd)
        with os.fdopen(os.dup(fd), "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    finally:
        os.close(fd)


def walk_tree(top: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """Every non-directory under `top` as (posix path relative to `top`, path), sorted, and
    every directory, each before its parent. A symlink to a directory counts as a file: it
    is reported rather than followed or silently left out."""
    files: list[tuple[str, Path]] = []
    directories: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        base = Path(dirpath)
        directories.append(base)
        linked_dirs = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted([*filenames, *linked_dirs]):
            path = base / name
            files.append((path.relative_to(top).as_posix(), path))
    directories.reverse()
    return files, directories


def seal_tree(
    top: Path, *, once_hashed: Callable[[Mapping[str, FileRecord]], None] | None = None
) -> Mapping[str, FileRecord]:
    """Over what CRIU wrote (and has closed): make files 0600 and directories 0700, hash
    (BLAKE3) and fsync every file, fsync every directory. Returns each file's size and digest.
    Every file is hashed and fsynced in worker threads at once. `once_hashed` is called with
    the records as soon as every file is hashed, while fsyncs may still wait on the disk
    (meta.json is written then); what it raises is raised once the fsyncs are done."""
    files, directories = walk_tree(top)
    with ThreadPoolExecutor(max_workers=SEAL_WORKERS) as pool:
        synced, hashed = [], {}
        for rel, path in files:
            synced.append(pool.submit(_sync_file, path))
            hashed[rel] = pool.submit(_hash_file, path)
        records = {rel: future.result() for rel, future in hashed.items()}
        try:
            if once_hashed is not None:
                once_hashed(records)
        finally:
            for future in synced:
                future.result()
    for directory in directories:
        os.chmod(directory, DIR_MODE)
        fsync_dir(directory)
    return records


def _hash_file(path: Path) -> FileRecord:
    fd = open_regular(path)
    try:
        return FileRecord(size=os.fstat(fd).st_size, digest=blake3_of_fd(fd))
    finally:
        os.close(fd)


def _sync_file(path: Path) -> None:
    """Make the file private and durable."""
    fd = open_regular(path)
    try:
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)
