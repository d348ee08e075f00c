"""Supervised programs' stdout and stderr: pipes the supervisor drains into rotating log files.

The supervisor keeps the read end of each pipe. A CRIU restore gets a new pipe whose write end
is handed to CRIU, so `pump_output` is simply started again on the new stream, with the same sink.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import structlog
import trio

FILE_MODE = 0o640
DIRECTORY_MODE = 0o750
READ_CHUNK_BYTES = 65536
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
        _make_directories(path.parent)
        self._fd = self._open_fd()

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

    def close(self) -> None:
        self._closed = True
        self._close_fd()

    def _open_fd(self, truncate: bool = False) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        if truncate:
            flags |= os.O_TRUNC
        fd = os.open(self.path, flags, FILE_MODE)
        self._size = os.fstat(fd).st_size
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


def _make_directories(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        each.mkdir(mode=DIRECTORY_MODE, exist_ok=True)


def open_output_pipe() -> tuple[int, trio.lowlevel.FdStream]:
    """A new pipe: (its write end for the child, non-inheritable; a stream over its read end)."""
    read_fd, write_fd = os.pipe()
    try:
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
