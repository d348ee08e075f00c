"""The supervisor's side of the stdio keeper (the helper grenadine-keep, see
grenadine_sv/helpers/grenadine-keep.c): find it or start it, hand it the read end of each new
output pipe, take them back after a crash."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from grenadine_sv.helpers import HelperMissing, helper_path

KEEPER = "grenadine-keep"
SOCKET_NAME = "stdio-keeper.sock"
# The longest request the keeper reads.
MAX_MESSAGE = 65536
# A reply can be longer than a request: `list` names every pipe held (2 per program).
MAX_REPLY = 1 << 20
STOP_WAIT_SECONDS = 5.0
# How long the keeper waits for a supervisor once every program whose output it holds is gone.
IDLE_SECONDS = 600.0

log = structlog.get_logger()


class KeeperError(Exception):
    """The stdio keeper could not be reached or refused a request."""


def pipe_key(program: str, stream: str, read_fd: int) -> str:
    """The name a pipe is held under: program, stream and the pipe's inode (unique while open)."""
    return f"{program}/{stream}/{os.fstat(read_fd).st_ino}"


def key_program(key: str) -> str:
    return key.split("/", 1)[0]


def key_stream(key: str) -> str:
    return key.split("/")[1]


def _keys_and_fds(
    program: str, pipes: Sequence[tuple[str, int]]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    keys = tuple(pipe_key(program, stream, read_fd) for stream, read_fd in pipes)
    return keys, tuple(read_fd for _stream, read_fd in pipes)


class StdioKeeper:
    """A connection to the keeper process of one state_dir. Thread-safe: a restore deposits
    its pipes from a worker thread. A request never holds the lock across an await: one made
    on the event loop blocks it for a round trip, which is how the loop can never wait on a
    lock that only itself could release."""

    def __init__(self, conn: socket.socket, process: subprocess.Popen[bytes] | None) -> None:
        self._conn = conn
        self._process = process
        self._lock = threading.Lock()
        # False once the keeper refused a keep of several keys (a keeper from before those).
        self._keeps_several = True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @classmethod
    def connect_or_start(cls, state_dir: Path) -> StdioKeeper:
        """The keeper a previous supervisor left running, else a new one. The caller holds
        the state_dir lock, so no other supervisor races for the socket."""
        path = state_dir / SOCKET_NAME
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            conn.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        else:
            keeper = cls(conn, None)
            keeper._request({"op": "list"})
            log.info("stdio_keeper_found", socket=str(path))
            return keeper
        return cls._start(path)

    @classmethod
    def _start(cls, path: Path) -> StdioKeeper:
        try:
            executable = helper_path(KEEPER)
        except HelperMissing as exc:
            raise KeeperError(str(exc)) from exc
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(os.fspath(path))
            finally:
                os.umask(old_umask)
            listener.listen(8)
            process = subprocess.Popen(
                [executable, str(listener.fileno()), str(IDLE_SECONDS)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
        finally:
            listener.close()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.connect(os.fspath(path))
        log.info("stdio_keeper_started", pid=process.pid, socket=str(path))
        return cls(conn, process)

    def keep(self, program: str, stream: str, read_fd: int) -> str:
        return self.keep_all(program, ((stream, read_fd),))[0]

    def keep_all(self, program: str, pipes: Sequence[tuple[str, int]]) -> tuple[str, ...]:
        """`keep` each (stream, read_fd) of `pipes` in one request: all of them are held,
        or (KeeperError) none."""
        keys, fds = _keys_and_fds(program, pipes)
        if self._keeps_several:
            try:
                self._request({"op": "keep", "keys": list(keys)}, fds)
            except KeeperError as exc:
                self._unless_refused_as_old(exc)
            else:
                return keys
        self._keep_one_by_one(keys, fds)
        return keys

    def _unless_refused_as_old(self, exc: KeeperError) -> None:
        """Re-raise `exc` unless it is how a keeper from before "keys" refuses them; remember
        that it is one."""
        if not str(exc).startswith("bad request"):
            raise exc
        self._keeps_several = False

    def _keep_one_by_one(self, keys: tuple[str, ...], fds: tuple[int, ...]) -> None:
        kept: list[str] = []
        try:
            for key, read_fd in zip(keys, fds, strict=True):
                self._request({"op": "keep", "key": key}, (read_fd,))
                kept.append(key)
        except KeeperError:
            for key in kept:
                with contextlib.suppress(KeeperError):
                    self.drop(key)
            raise

    def drop(self, key: str) -> None:
        self._request({"op": "drop", "key": key})

    def take_all(self) -> dict[str, int]:
        """Copies of every held read end, by key (the keeper keeps its own until dropped)."""
        keys = self._request({"op": "list"})[0].get("keys", [])
        taken: dict[str, int] = {}
        for key in keys:
            _answer, fd = self._request({"op": "take", "key": key})
            if fd is not None:
                taken[str(key)] = fd
        return taken

    def close(self, *, stop_keeper: bool) -> None:
        """Disconnect; with `stop_keeper`, the keeper exits (nothing it held is needed)."""
        if stop_keeper:
            with contextlib.suppress(KeeperError):
                self._request({"op": "quit"})
        self._conn.close()
        if self._process is not None and stop_keeper:
            try:
                self._process.wait(timeout=STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _request(
        self, request: dict[str, Any], fds_sent: Sequence[int] = ()
    ) -> tuple[dict[str, Any], int | None]:
        with self._lock:
            self._send(request, fds_sent)
            return self._receive()

    def _send(self, request: dict[str, Any], fds_sent: Sequence[int]) -> None:
        message = json.dumps(request).encode()
        try:
            if not fds_sent:
                self._conn.sendmsg([message])
            else:
                rights = array.array("i", fds_sent)
                self._conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except OSError as exc:
            raise KeeperError(f"stdio keeper unreachable: {exc}") from exc

    def _receive(self) -> tuple[dict[str, Any], int | None]:
        fds = array.array("i")
        try:
            data, ancillary, flags, _address = self._conn.recvmsg(
                MAX_REPLY, socket.CMSG_SPACE(fds.itemsize)
            )
        except OSError as exc:
            raise KeeperError(f"stdio keeper unreachable: {exc}") from exc
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data or flags & socket.MSG_TRUNC:
            for received in fds:
                os.close(received)
            raise KeeperError(
                "stdio keeper went away"
                if not data
                else f"stdio keeper's reply exceeds {MAX_REPLY} bytes"
            )
        answer = json.loads(data)
        if not answer.get("ok"):
            for received in fds:
                os.close(received)
            raise KeeperError(str(answer.get("error")))
        return answer, (fds[0] if fds else None)
