"""When a supervisor is ready: it answers on its control socket, which is more than accepting.
It listens from its first step (listening is what claims the socket) and answers only once
its image store is recovered, so whoever waits for it waits for an answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from grenadine_sv.control.client import answering_pid
from grenadine_sv.control.protocol import socket_is_live
from grenadine_sv.control.server import bind_socket, serve

SUPERVISOR_PID = 4321


async def answer_ping(command: str, args: dict[str, Any]) -> dict[str, int]:
    assert command == "ping"
    return {"pid": SUPERVISOR_PID}


async def test_nothing_answers_where_nothing_listens(tmp_path: Path) -> None:
    assert await trio.to_thread.run_sync(answering_pid, tmp_path / "control.sock") is None


async def test_a_claimed_socket_accepts_at_once_and_answers_once_served(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    sock = bind_socket(path)
    with sock:
        assert socket_is_live(path)
        # 0.2 s: a bound on an answer that must not come while nothing serves.
        assert await trio.to_thread.run_sync(answering_pid, path, 0.2) is None
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, answer_ping)
            assert await trio.to_thread.run_sync(answering_pid, path) == SUPERVISOR_PID
            nursery.cancel_scope.cancel()
