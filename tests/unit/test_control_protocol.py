"""The control socket's wire format, on both ends: what a request line may be, and how
much of one the server reads."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from grenadine_sv.control.protocol import MAX_LINE_BYTES, ProtocolError, decode_request, encode
from grenadine_sv.control.server import LONG_LINE_BYTES, LongLines, read_line


def test_a_request_is_a_command_with_optional_arguments() -> None:
    assert decode_request(b'{"command": "status"}') == ("status", {})
    assert decode_request(b'{"command": "stop", "args": {"names": ["a"]}}') == (
        "stop",
        {"names": ["a"]},
    )


def test_what_the_client_encodes_the_server_decodes() -> None:
    line = encode({"command": "restore", "args": {"name": "web", "image": "latest"}})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_request(line.rstrip(b"\n")) == ("restore", {"name": "web", "image": "latest"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"status", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        (b'["status"]', "must be a JSON object"),
        (b'{"args": {}}', 'needs "command"'),
        (b'{"command": 3}', 'needs "command"'),
        (b'{"command": "stop", "args": ["a"]}', '"args" (an object)'),
        (b"[" * 100_000, "not a JSON object"),
    ],
)
def test_anything_else_is_refused_with_a_reason(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_request(line)


def test_replies_carry_values_json_cannot_by_their_text() -> None:
    assert json.loads(encode({"ok": True, "result": Path("/x")})) == {"ok": True, "result": "/x"}


@asynccontextmanager
async def every_slot_taken(long_lines: LongLines) -> AsyncIterator[None]:
    """Other clients' tasks hold every long-line slot meanwhile."""
    done = trio.Event()

    async def hold() -> None:
        with long_lines.slot():
            await done.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(long_lines.free):
            nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        assert long_lines.free == 0
        yield
        done.set()


async def read_sent(payload: bytes, long_lines: LongLines) -> tuple[bytes | None, bytearray]:
    """What the server's read_line makes of `payload`, sent whole and then closed."""
    server_end, client_end = trio.socket.socketpair()
    buffer = bytearray()
    async with trio.SocketStream(server_end) as server, trio.SocketStream(client_end) as client:

        async def send() -> None:
            # The server may stop reading before the end of it.
            with contextlib.suppress(trio.BrokenResourceError):
                await client.send_all(payload)
            await client.send_eof()

        refused: ProtocolError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                line = await read_line(server, buffer, long_lines)
            except ProtocolError as exc:
                # Raised out here, not as a group out of the nursery.
                refused = exc
            nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return line, buffer


async def test_a_line_up_to_the_long_line_bytes_needs_no_slot() -> None:
    long_lines = LongLines(2)
    async with every_slot_taken(long_lines):
        line, _ = await read_sent(b"x" * LONG_LINE_BYTES + b"\n", long_lines)
    assert line == b"x" * LONG_LINE_BYTES


async def test_a_longer_line_is_refused_while_every_slot_is_taken() -> None:
    long_lines = LongLines(2)
    async with every_slot_taken(long_lines):
        with pytest.raises(ProtocolError, match=r"reading other long requests.*send yours again"):
            await read_sent(b"x" * MAX_LINE_BYTES + b"\n", long_lines)


async def test_a_refused_client_holds_no_more_than_the_long_line_bytes() -> None:
    long_lines = LongLines(1)
    buffer = bytearray()
    async with every_slot_taken(long_lines):
        server_end, client_end = trio.socket.socketpair()
        async with (
            trio.SocketStream(server_end) as server,
            trio.SocketStream(client_end) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.send_all, b"x" * (4 * LONG_LINE_BYTES))
            with pytest.raises(ProtocolError):
                await read_line(server, buffer, long_lines)
            nursery.cancel_scope.cancel()
    assert len(buffer) == LONG_LINE_BYTES + 1


async def test_a_longer_line_is_read_in_a_slot_given_back_after_it() -> None:
    long_lines = LongLines(1)
    line, _ = await read_sent(b"x" * MAX_LINE_BYTES + b"\n", long_lines)
    assert line == b"x" * MAX_LINE_BYTES
    assert long_lines.free == 1
    with pytest.raises(ProtocolError, match=f"longer than {MAX_LINE_BYTES} bytes"):
        await read_sent(b"x" * (MAX_LINE_BYTES + 1) + b"\n", long_lines)
    assert long_lines.free == 1


async def test_a_slot_is_given_back_when_the_client_leaves_mid_line() -> None:
    long_lines = LongLines(1)
    line, buffer = await read_sent(b"x" * (2 * LONG_LINE_BYTES), long_lines)
    assert line is None
    assert len(buffer) == 2 * LONG_LINE_BYTES
    assert long_lines.free == 1
