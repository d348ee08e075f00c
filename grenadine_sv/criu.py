"""CRIU through pycriu (swrk mode): dump and restore a sandboxed program. Blocking calls:
run them off the trio loop (trio.to_thread)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycriu

LOG_LEVEL = 4
ERROR_LINES_SHOWN = 8
SWRK_EXIT_SECONDS = 30.0


class CriuError(Exception):
    """CRIU refused or failed; the message carries CRIU's own error lines."""

    def __init__(self, action: str, detail: str, log_path: Path | None) -> None:
        where = f" (full log: {log_path})" if log_path is not None else ""
        super().__init__(f"criu {action} failed: {detail}{where}")
        self.action = action
        self.detail = detail
        self.log_path = log_path


@dataclass(frozen=True)
class DumpRequest:
    pid: int
    images_dir: Path
    leave_running: bool
    tcp_established: bool = False
    log_name: str = "dump.log"


@dataclass(frozen=True)
class RestoreRequest:
    images_dir: Path
    # Where CRIU writes its restore log (never the image, which stays as dumped).
    work_dir: Path
    # "pipe:[INODE]" (the pipe at dump time) -> an inheritable fd of this process.
    inherit_fds: Mapping[str, int]
    tcp_established: bool = False
    log_name: str = "restore.log"


def error_lines(log_path: Path) -> list[str]:
    """CRIU's own error lines from its log, the most telling last."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "error" in line]
    return lines[-ERROR_LINES_SHOWN:]


class Criu:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def dump(self, request: DumpRequest) -> None:
        log_path = request.images_dir / request.log_name
        with self._session((), "dump", log_path) as criu, _open_dir(request.images_dir) as dir_fd:
            opts = criu.opts
            opts.images_dir_fd = dir_fd
            opts.pid = request.pid
            opts.leave_running = request.leave_running
            opts.tcp_established = request.tcp_established
            opts.external.append("mnt[]")
            opts.log_file = request.log_name
            opts.log_level = LOG_LEVEL
            try:
                criu.dump()
            except pycriu.CRIUException as exc:
                raise self._failure("dump", exc, log_path) from exc

    def restore(self, request: RestoreRequest) -> int:
        """Restore the tree as a child of this process; returns the root's host pid."""
        log_path = request.work_dir / request.log_name
        fds = tuple(request.inherit_fds.values())
        with (
            self._session(fds, "restore", log_path) as criu,
            _open_dir(request.images_dir) as dir_fd,
            _open_dir(request.work_dir) as work_fd,
        ):
            opts = criu.opts
            opts.images_dir_fd = dir_fd
            opts.work_dir_fd = work_fd
            opts.root = "/"
            opts.rst_sibling = True
            opts.tcp_established = request.tcp_established
            opts.external.append("mnt[]")
            opts.log_file = request.log_name
            opts.log_level = LOG_LEVEL
            for key, fd in request.inherit_fds.items():
                entry = opts.inherit_fd.add()
                entry.key = key
                entry.fd = fd
            try:
                response = criu.restore()
            except pycriu.CRIUException as exc:
                raise self._failure("restore", exc, log_path) from exc
            return int(response.pid)

    @contextlib.contextmanager
    def _session(self, pass_fds: tuple[int, ...], action: str, log_path: Path) -> Iterator[Any]:
        """A `criu swrk` child speaking to a pycriu client over a socketpair.

        The child is started with subprocess (no fork of this threaded process), and
        receives the fds a restore must inherit.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            swrk = subprocess.Popen(
                [os.fspath(self.binary), "swrk", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *pass_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise CriuError(action, f"cannot run {self.binary}: {exc.strerror}", None) from exc
        finally:
            theirs.close()
        try:
            client = pycriu.criu()
            client.use_fd(ours.fileno())
            yield client
        finally:
            ours.close()
            try:
                swrk.wait(timeout=SWRK_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                swrk.kill()
                swrk.wait()

    @staticmethod
    def _failure(action: str, exc: Exception, log_path: Path) -> CriuError:
        lines = error_lines(log_path)
        detail = "; ".join(lines) if lines else str(exc)
        return CriuError(action, detail, log_path)


@contextlib.contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def pipe_key(inode: int) -> str:
    return f"pipe:[{inode}]"
