"""Supervised programs' stdout and stderr: pipes the supervisor drains into rotating log files.

The supervisor keeps the read end of each pipe. A CRIU restore gets a new pipe whose write end
is handed to CRIU, so `pump_output` is simply started again on the new stream, with the same sink.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import stat
from collections.abc import AsyncGenerator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import structlog
import trio

from grenadine_sv.store.trust import (
    UntrustedPath,
    check_owned_file,
    check_trusted_to_create,
    open_trusted_dir,
)

FILE_MODE = 0o640
DIRECTORY_MODE = 0o750
READ_CHUNK_BYTES = 65536
# What a program may write while no supervisor drains its pipe (see docs/stdio-keeper.md):
# pipes are enlarged to this, capped by /proc/sys/fs/pipe-max-size.
OUTPUT_PIPE_BYTES = 1 << 20
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
FOLLOW_POLL_SECONDS = 0.2

_log = structlog.get_logger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_line_prefix(moment: datetime) -> bytes:
    """`2026-11-27T05:30:00.123Z ` for any aware datetime; a naive one is taken as UTC."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z ".encode("ascii")


def read_tail(path: Path, n_bytes: int) -> bytes:
    """The last `n_bytes` of the file at `path`; empty when it does not exist."""
    if n_bytes < 0:
        raise ValueError(f"cannot read the last {n_bytes} bytes: give a count of 0 or more")
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            file.seek(max(0, size - n_bytes))
            return file.read(n_bytes)
    except FileNotFoundError:
        return b""


class RotatingLogFile:
    """An append-only file that rotates by size like supervisord's (path -> path.1 -> path.2 ...).

    `max_bytes=0` never rotates; `backups=0` truncates the file instead of keeping old ones.
    A write is split across a rotation only between lines, unless a line alone exceeds `max_bytes`.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        timestamps: bool = False,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes}: use 0 (never rotate) or a positive size")
        if backups < 0:
            raise ValueError(f"backups is {backups}: use 0 (truncate on rotation) or more")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.timestamps = timestamps
        self._clock = clock
        self._at_line_start = True
        self._closed = False
        self._fd: int | None = None
        self._size = 0
        self._dir_fd = open_log_dir(path)
        try:
            self._fd = self._open_fd()
        except BaseException:
            os.close(self._dir_fd)
            raise

    def __enter__(self) -> RotatingLogFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def write(self, data: bytes | bytearray) -> None:
        if self._closed:
            raise ValueError(f"log file {self.path} is closed")
        if not data:
            return
        self._writable_fd()  # reopens after a rotation that failed half-way, so the size is true
        if self.timestamps:
            data = self._prefix_lines(data)
        if self.max_bytes == 0:
            self._append(data)
        else:
            self._append_rotating(data)

    def tail(self, n_bytes: int) -> bytes:
        """The last `n_bytes` of the current file (not of older, rotated ones)."""
        return read_tail(self.path, n_bytes)

    def clear(self) -> None:
        """Empty the file and delete its rotated backups (supervisorctl's `clear`)."""
        self._close_fd()
        number = 1
        while (backup := _backup_path(self.path, number)).exists() or number <= self.backups:
            backup.unlink(missing_ok=True)
            number += 1
        self._fd = self._open_fd(truncate=True)
        self._at_line_start = True

    def close(self) -> None:
        if not self._closed:
            os.close(self._dir_fd)
        self._closed = True
        self._close_fd()

    def _open_fd(self, truncate: bool = False) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        if truncate:
            flags |= os.O_TRUNC
        check_owned_file(self._dir_fd, self.path.name, self.path, what="log file")
        fd = os.open(self.path.name, flags, FILE_MODE, dir_fd=self._dir_fd)
        try:
            self._size = _own_private_file(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _writable_fd(self) -> int:
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            # Deleted while open (rm, a careless logrotate): writing on would fill an inode
            # nobody can read. Start the file again at its path.
            _log.warning("log_file_reopened", path=str(self.path), reason="it was deleted")
            self._close_fd()
        if self._fd is None:
            self._fd = self._open_fd()
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _prefix_lines(self, data: bytes | bytearray) -> bytes:
        prefix = format_line_prefix(self._clock())
        pieces = bytes(data).split(b"\n")
        out = bytearray()
        for index, piece in enumerate(pieces):
            ends_line = index < len(pieces) - 1
            if not piece and not ends_line:
                break  # data ended with a newline: the next line has not started yet
            if self._at_line_start:
                out += prefix
            out += piece
            if ends_line:
                out += b"\n"
            self._at_line_start = ends_line
        return bytes(out)

    def _append_rotating(self, data: bytes | bytearray) -> None:
        start = 0
        while start < len(data):
            room = self.max_bytes - self._size
            if len(data) - start <= room:
                self._append(data[start:])
                return
            whole_lines_end = data.rfind(b"\n", start, start + max(room, 0)) + 1
            if whole_lines_end > start:
                self._append(data[start:whole_lines_end])
                start = whole_lines_end
            elif self._size == 0:  # one line longer than a whole file: cut it
                self._append(data[start : start + room])
                start += room
            self._rotate()

    def _append(self, data: bytes | bytearray) -> None:
        fd = self._writable_fd()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        self._close_fd()
        if self.backups == 0:
            self._fd = self._open_fd(truncate=True)
            return
        for number in range(self.backups - 1, 0, -1):
            older = _backup_path(self.path, number)
            if older.exists():
                older.replace(_backup_path(self.path, number + 1))
        if self.path.exists():
            self.path.replace(_backup_path(self.path, 1))
        self._fd = self._open_fd()


def _backup_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _own_private_file(fd: int, path: Path) -> int:
    """Check the opened log file is ours and make it private; returns its size."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
        raise UntrustedPath(f"log file {path} was replaced while being opened")
    if stat.S_IMODE(info.st_mode) & ~FILE_MODE:
        os.fchmod(fd, FILE_MODE)  # made by hand (or by an old version) too open
    return info.st_size


# Log directories already walked and found trusted, by configured path -> an fd of each (one
# per directory, most often the single log_dir): a program's two log files take a copy of it
# instead of walking from / again (~0.3 ms each), for as long as the path still leads to that
# very directory. Each log file keeps its own copy for life, unchecked, as it always did.
_trusted_log_dirs: dict[Path, int] = {}
MAX_TRUSTED_LOG_DIRS = 16


def _trusted_log_dir(directory: Path) -> int:
    """An fd (the caller's to close) of `directory`, created if need be, once it and every
    directory above it are trusted (store/trust.py); raise UntrustedPath otherwise."""
    known = _trusted_log_dirs.get(directory)
    if known is not None:
        try:
            if os.path.samestat(os.stat(directory), os.fstat(known)):
                return os.dup(known)
        except OSError:
            pass  # gone: walked again below
        os.close(_trusted_log_dirs.pop(directory))
    check_trusted_to_create(directory, what="log directory")
    _make_directories(directory)
    dir_fd = open_trusted_dir(directory, what="log directory")
    if len(_trusted_log_dirs) >= MAX_TRUSTED_LOG_DIRS:
        os.close(_trusted_log_dirs.pop(next(iter(_trusted_log_dirs))))
    _trusted_log_dirs[directory] = os.dup(dir_fd)
    return dir_fd


def open_log_dir(log_file: Path) -> int:
    """Create the directories of `log_file` if need be and return an fd of the last one, once
    it and every directory above it are trusted (store/trust.py), and `log_file`, if it
    exists, is a regular file of the supervisor's user. Raise UntrustedPath otherwise."""
    dir_fd = _trusted_log_dir(log_file.parent)
    try:
        check_owned_file(dir_fd, log_file.name, log_file, what="log file")
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def check_log_files(log_files: Iterable[Path]) -> None:
    """Raise UntrustedPath when output could not safely be written to one of `log_files`.
    Each directory is checked once, with all its files (every program's two files, most
    often in one log_dir, are a walk from / each otherwise: ~0.3 ms apiece)."""
    by_directory: dict[Path, list[Path]] = {}
    for log_file in log_files:
        by_directory.setdefault(log_file.parent, []).append(log_file)
    for first, *others in by_directory.values():
        dir_fd = open_log_dir(first)
        try:
            for log_file in others:
                check_owned_file(dir_fd, log_file.name, log_file, what="log file")
        finally:
            os.close(dir_fd)


def _make_directories(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        each.mkdir(mode=DIRECTORY_MODE, exist_ok=True)


@functools.cache
def output_pipe_size() -> int:
    """OUTPUT_PIPE_BYTES, or the host's pipe-max-size if lower (read once)."""
    try:
        limit = int(PIPE_MAX_SIZE.read_text())
    except (OSError, ValueError):
        limit = OUTPUT_PIPE_BYTES
    return min(OUTPUT_PIPE_BYTES, limit)


def enlarge_pipe(fd: int) -> None:
    """Give the pipe room for `output_pipe_size()` bytes."""
    with contextlib.suppress(OSError):  # too many pipe pages for this user: keep the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, output_pipe_size())


def open_output_pipe() -> tuple[int, trio.lowlevel.FdStream]:
    """A new pipe: (its write end for the child, non-inheritable; a stream over its read end)."""
    read_fd, write_fd = os.pipe()
    try:
        enlarge_pipe(read_fd)
        return write_fd, trio.lowlevel.FdStream(read_fd)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise


async def pump_output(
    receive: trio.abc.ReceiveStream, sink: RotatingLogFile, *, max_chunk: int = READ_CHUNK_BYTES
) -> None:
    """Copy `receive` into `sink` until end of file. Closes neither.

    A failed write (a full disk, say) is logged and the data dropped: the pipe keeps being
    drained, so the program does not block on a full pipe.
    """
    failing = False
    while data := await receive.receive_some(max_chunk):
        try:
            sink.write(data)
        except OSError as error:
            if not failing:
                _log.warning("program_output_write_failed", path=str(sink.path), error=str(error))
            failing = True
        else:
            if failing:
                _log.info("program_output_write_recovered", path=str(sink.path))
            failing = False


def drain_available(read_fd: int, sink: RotatingLogFile) -> bool:
    """Copy what a pipe holds now into `sink`; True when it reached end of file (no writer
    is left), False when a writer may still add more."""
    os.set_blocking(read_fd, False)
    while True:
        try:
            data = os.read(read_fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return False
        if not data:
            return True
        try:
            sink.write(data)
        except OSError as error:
            _log.warning("program_output_write_failed", path=str(sink.path), error=str(error))


async def follow(
    path: Path, from_end_bytes: int, *, poll_seconds: float = FOLLOW_POLL_SECONDS
) -> AsyncGenerator[bytes, None]:
    """Yield the last `from_end_bytes` of `path`, then new data as it is written, like `tail -F`.

    Follows rotation: the old file is read to its end, then the new one from its start.
    A truncated file is read again from its start. Use it inside `contextlib.aclosing`.
    """
    if from_end_bytes < 0:
        raise ValueError(f"cannot show the last {from_end_bytes} bytes: give 0 or more")
    try:
        file = io.FileIO(path, "rb")
    except FileNotFoundError:
        file = await _open_when_present(path, poll_seconds)  # all it will hold is new
    else:
        file.seek(max(0, os.fstat(file.fileno()).st_size - from_end_bytes))
    try:
        while True:
            if chunk := file.read(READ_CHUNK_BYTES):
                yield chunk
                continue
            if _was_truncated(path, file):
                file.seek(0)
            elif _was_replaced(path, file):
                while rest := file.read(READ_CHUNK_BYTES):
                    yield rest
                file.close()
                file = await _open_when_present(path, poll_seconds)
            else:
                await trio.sleep(poll_seconds)
    finally:
        file.close()


async def _open_when_present(path: Path, poll_seconds: float) -> io.FileIO:
    while True:
        try:
            return io.FileIO(path, "rb")
        except FileNotFoundError:
            await trio.sleep(poll_seconds)


def _was_replaced(path: Path, file: io.FileIO) -> bool:
    try:
        current = path.stat()
    except FileNotFoundError:
        return False  # rotated away and not yet re-created: keep the old one until it is
    opened = os.fstat(file.fileno())
    return (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino)


def _was_truncated(path: Path, file: io.FileIO) -> bool:
    return os.fstat(file.fileno()).st_size < file.tell()
