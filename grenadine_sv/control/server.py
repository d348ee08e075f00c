"""The control socket's server: binds the socket, reads requests, sends replies
(the format is in control/protocol.py)."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import structlog
import trio

from grenadine_sv.control.protocol import (
    MAX_LINE_BYTES,
    ControlError,
    ProtocolError,
    decode_request,
    encode,
    socket_is_live,
)

CLIENT_IDLE_SECONDS = 30.0
# Every real request is far shorter; a longer one is read only in one of LONG_LINE_SLOTS.
LONG_LINE_BYTES = 64 << 10
LONG_LINE_SLOTS = 4
RECEIVE_BYTES = 65536

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class LongLines:
    """The few slots in which a line longer than LONG_LINE_BYTES is read: a client whose
    line grows past it while every slot is taken is refused, so many clients each sending
    an unfinished long line hold at most LONG_LINE_BYTES each in the supervisor's memory,
    not MAX_LINE_BYTES each."""

    def __init__(self, slots: int = LONG_LINE_SLOTS) -> None:
        self._limiter = trio.CapacityLimiter(slots)

    @property
    def free(self) -> int:
        return int(self._limiter.available_tokens)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold a slot for the current task; ProtocolError when none is free."""
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            raise ProtocolError(
                f"the supervisor is reading other long requests (over {LONG_LINE_BYTES}"
                " bytes); send yours again later"
            ) from None
        try:
            yield
        finally:
            self._limiter.release()


async def read_line(
    stream: trio.SocketStream, buffer: bytearray, long_lines: LongLines
) -> bytes | None:
    """Read one newline-terminated line; None at EOF. Raises ProtocolError past MAX_LINE_BYTES,
    or past LONG_LINE_BYTES when no long-line slot is free."""
    with ExitStack() as held:
        limit = LONG_LINE_BYTES
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                return line
            if len(buffer) > limit:
                if limit == MAX_LINE_BYTES:
                    raise ProtocolError(f"request longer than {MAX_LINE_BYTES} bytes")
                held.enter_context(long_lines.slot())
                limit = MAX_LINE_BYTES
            # At most one byte past the limit: the buffer is bounded, not only the line.
            chunk = await stream.receive_some(min(RECEIVE_BYTES, limit + 1 - len(buffer)))
            if not chunk:
                return None
            buffer += chunk


def bind_socket(path: Path) -> trio.socket.SocketType:
    """Bind the control socket, mode 0600, replacing a stale one but never a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlError(f"{path} exists and is not a socket; remove it or choose another")
        if socket_is_live(path):
            raise ControlError(f"another supervisor is listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.socket.from_stdlib_socket(sock)


async def serve(
    sock: trio.socket.SocketType,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.SocketListener(sock)
    long_lines = LongLines()
    task_status.started()
    await trio.serve_listeners(
        lambda stream: _serve_client(stream, handler, long_lines),  # type: ignore[arg-type]
        [listener],
    )


async def _serve_client(stream: trio.SocketStream, handler: Handler, long_lines: LongLines) -> None:
    """Answer requests until the client closes; after an error reply (a malformed line, an
    unknown command, a refused request) the connection is closed, so a confused client
    cannot go on talking past it."""
    log = structlog.get_logger()
    buffer = bytearray()
    async with stream:
        while True:
            try:
                with trio.fail_after(CLIENT_IDLE_SECONDS):
                    line = await read_line(stream, buffer, long_lines)
            except (ProtocolError, trio.TooSlowError) as exc:
                await _send_quietly(
                    stream, {"ok": False, "error": str(exc) or "client idle too long"}
                )
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if line is None:
                return
            try:
                command, args = decode_request(line)
            except ProtocolError as exc:
                await _send_quietly(stream, {"ok": False, "error": str(exc)})
                return
            try:
                result = await handler(command, args)
            except ControlError as exc:
                await _send_quietly(stream, {"ok": False, "error": str(exc), "usage": exc.usage})
                return
            except Exception as exc:
                log.exception("control_request_failed", command=command)
                await _send_quietly(stream, {"ok": False, "error": f"internal error: {exc!r}"})
                return
            if not await _send_quietly(stream, {"ok": True, "result": result}):
                return


async def _send_quietly(stream: trio.SocketStream, reply: dict[str, Any]) -> bool:
    """Send a reply; False when the client has gone away."""
    try:
        await stream.send_all(encode(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
