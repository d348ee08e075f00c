"""Sealing an image: every file hashed (BLAKE3) and made durable (fsync), overlapped with CRIU's
own writing.

While CRIU dumps, a `DumpWatcher` follows its image directory through inotify: a file is opened
when it appears, hashed chunk by chunk as it grows (from the page cache, through mmap: no copy,
no disk read), and finished (rest hashed, fsync started in the background) as soon as CRIU
closes it. When CRIU has exited, `seal_tree` only
finishes what the watcher could not vouch for: a file it did not see, or one changed after
CRIU closed it (another size, mtime or inode) is hashed again from the start.

Older images carry SHA-256 digests; `digest_of` still computes those for `verify`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import blake3
import inotify_simple

from grenadine_sv.store.durable import DIR_MODE, FILE_MODE, fsync_dir

ChecksumAlgorithm = Literal["sha256", "blake3"]
NEW_IMAGE_ALGORITHM: ChecksumAlgorithm = "blake3"

# Threads that seal an image: fsyncs wait on the disk while hashes use the CPUs.
SEAL_WORKERS = 4
# The watcher hashes a growing file in pieces of this size (a multiple of the page size).
CHUNK_BYTES = 8 << 20
POLL_MILLISECONDS = 20
WATCHER_NICE = 19

_WATCHED = inotify_simple.flags.CREATE | inotify_simple.flags.CLOSE_WRITE


@dataclass(frozen=True)
class FileRecord:
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


def _update_from(hasher: blake3.blake3, fd: int, start: int, end: int) -> None:
    """Hash bytes [start, end) of the file (start page-aligned), straight from the page cache."""
    if end <= start:
        return
    with mmap.mmap(fd, end - start, prot=mmap.PROT_READ, offset=start) as mapped:
        hasher.update(mapped)


def _new_blake3(threads: int) -> blake3.blake3:
    return blake3.blake3(max_threads=threads)


def blake3_of_fd(fd: int, *, threads: int = blake3.blake3.AUTO) -> str:
    hasher = _new_blake3(threads)
    _update_from(hasher, fd, 0, os.fstat(fd).st_size)
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


@dataclass
class _Followed:
    """One file the watcher follows while CRIU writes it."""

    fd: int
    hasher: blake3.blake3 = field(default_factory=lambda: _new_blake3(1))
    hashed: int = 0
    sync: Future[None] | None = None
    closed: tuple[int, int, int, int] | None = None
    """(size, mtime_ns, ctime_ns, inode) when CRIU closed it and the watcher hashed it all."""
    digest: str | None = None


class DumpWatcher:
    """Hashes and syncs CRIU's files as it writes and closes them (see the module docstring).

    Use as a context manager around the dump; `records` then gives what it could vouch for."""

    def __init__(self, top: Path, pool: ThreadPoolExecutor) -> None:
        self._top = top
        self._pool = pool
        self._files: dict[str, _Followed] = {}
        self._stop = threading.Event()
        self._inotify = inotify_simple.INotify()
        self._inotify.add_watch(top, _WATCHED)
        self._thread = threading.Thread(target=self._run, name="image-watcher", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> DumpWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # CRIU is done: what is left to hash is on the critical path now.
        self._set_nice(0)
        self._stop.set()
        self._thread.join()
        self._inotify.close()

    def _set_nice(self, nice: int) -> None:
        tid = self._thread.native_id
        if tid is not None:
            with contextlib.suppress(OSError):  # raising it back needs CAP_SYS_NICE
                os.setpriority(os.PRIO_PROCESS, tid, nice)

    def _run(self) -> None:
        # While CRIU runs (the program frozen), hashing only takes CPU time CRIU leaves idle.
        self._set_nice(WATCHER_NICE)
        try:
            while not self._stop.is_set():
                for event in self._inotify.read(timeout=POLL_MILLISECONDS):
                    self._on_event(event)
                for followed in list(self._files.values()):
                    if followed.closed is None:
                        self._catch_up(followed, final=False)
            for event in self._inotify.read(timeout=0):
                self._on_event(event)
        except BaseException as exc:  # the seal falls back to hashing everything itself
            self.error = exc

    def _on_event(self, event: inotify_simple.Event) -> None:
        if not event.name or event.mask & inotify_simple.flags.ISDIR:
            return
        followed = self._files.get(event.name)
        if event.mask & inotify_simple.flags.CREATE and followed is None:
            try:
                fd = open_regular(self._top / event.name)
            except ValueError:
                return  # not a regular file (or gone): the final walk reports it
            os.fchmod(fd, FILE_MODE)  # private before CRIU has written much into it
            followed = self._files[event.name] = _Followed(fd)
        closed = event.mask & inotify_simple.flags.CLOSE_WRITE
        if closed and followed is not None and followed.closed is None:
            self._catch_up(followed, final=True)

    def _catch_up(self, followed: _Followed, *, final: bool) -> None:
        st = os.fstat(followed.fd)
        end = st.st_size if final else st.st_size - st.st_size % CHUNK_BYTES
        while followed.hashed + CHUNK_BYTES <= end:
            start = followed.hashed
            _update_from(followed.hasher, followed.fd, start, start + CHUNK_BYTES)
            followed.hashed += CHUNK_BYTES
        if final:
            _update_from(followed.hasher, followed.fd, followed.hashed, st.st_size)
            followed.hashed = st.st_size
            followed.digest = followed.hasher.hexdigest()
            followed.closed = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            # Synced once closed, never while CRIU writes it: write-back under a dump that
            # still writes lengthened the freeze (1 GiB, quiet machine: frozen time 1.87x raw
            # CRIU's with an fdatasync every 64 MiB, 1.10x without).
            followed.sync = self._pool.submit(os.fsync, followed.fd)

    def records(self) -> Iterator[tuple[str, _Followed]]:
        """Files CRIU closed once, as the watcher saw them (after the context has exited)."""
        for name, followed in list(self._files.items()):
            if followed.closed is not None:
                yield name, followed

    def close_files(self) -> None:
        for followed in self._files.values():
            if followed.sync is not None:
                followed.sync.exception()
            os.close(followed.fd)
        self._files.clear()


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


def seal_tree(top: Path, watcher: DumpWatcher | None = None) -> Mapping[str, FileRecord]:
    """Over what CRIU wrote (and has closed): make files 0600 and directories 0700, hash
    (BLAKE3) and fsync every file, fsync every directory. Returns each file's size and digest.

    Files the watcher already hashed and synced, and that did not change since, are taken as
    they are; the rest are hashed (on all cores) and fsynced in worker threads at once."""
    files, directories = walk_tree(top)
    seen = dict(watcher.records()) if watcher is not None and watcher.error is None else {}
    try:
        with ThreadPoolExecutor(max_workers=SEAL_WORKERS) as pool:
            pending: dict[str, Callable[[], FileRecord]] = {}
            for rel, path in files:
                followed = seen.get(rel)
                if followed is not None:
                    pending[rel] = _vouched(path, followed)
                else:
                    pending[rel] = _seal_in(pool, path)
            records = {rel: finish() for rel, finish in pending.items()}
    finally:
        if watcher is not None:
            watcher.close_files()
    for directory in directories:
        os.chmod(directory, DIR_MODE)
        fsync_dir(directory)
    return records


def _vouched(path: Path, followed: _Followed) -> Callable[[], FileRecord]:
    """The watcher's record of `path` if the file is still the one it hashed, else a new seal."""

    def finish() -> FileRecord:
        assert followed.closed is not None
        assert followed.digest is not None
        st = os.fstat(followed.fd)
        try:
            now = path.lstat()
        except FileNotFoundError:
            now = None
        unchanged = (
            now is not None
            and stat.S_ISREG(now.st_mode)
            and stat.S_IMODE(now.st_mode) == FILE_MODE
            and (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == followed.closed
            and now.st_ino == st.st_ino
        )
        if followed.sync is not None:
            followed.sync.result()
        if not unchanged:
            return _seal_file(path)
        return FileRecord(size=st.st_size, digest=followed.digest)

    return finish


def _seal_in(pool: ThreadPoolExecutor, path: Path) -> Callable[[], FileRecord]:
    """Make the file private and durable, and hash it: both at once in `pool`."""
    synced = pool.submit(_sync_file, path)
    hashed = pool.submit(digest_of, path, "blake3")
    return lambda: FileRecord(size=synced.result(), digest=hashed.result())


def _seal_file(path: Path) -> FileRecord:
    return FileRecord(size=_sync_file(path), digest=digest_of(path, "blake3"))


def _sync_file(path: Path) -> int:
    """Make the file private and durable; returns its size."""
    fd = open_regular(path)
    try:
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
