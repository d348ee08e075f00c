"""The keeper client against a fake keeper: one from before `keep` took several keys (a
supervisor upgraded while the keeper a previous one started still runs), which it asks one key
at a time."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from grenadine_sv.keeper.client import MAX_MESSAGE, KeeperError, StdioKeeper

OLD_REFUSAL = {"ok": False, "error": "bad request: key missing or not a string"}
Answer = Callable[[dict[str, Any]], dict[str, Any]]


def old_keeper(request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True} if "key" in request else OLD_REFUSAL


def serve(conn: socket.socket, answer: Answer, seen: list[dict[str, Any]]) -> None:
    while True:
        data, fds, _flags, _address = socket.recv_fds(conn, MAX_MESSAGE, 8)
        if not data:
            return
        for fd in fds:
            os.close(fd)
        seen.append(json.loads(data))
        conn.send(json.dumps(answer(seen[-1])).encode())


@pytest.fixture
def pipes() -> Iterator[tuple[tuple[str, int], ...]]:
    out, err = os.pipe(), os.pipe()
    yield ("stdout", out[0]), ("stderr", err[0])
    for fd in (*out, *err):
        os.close(fd)


def connect(answer: Answer) -> tuple[StdioKeeper, list[dict[str, Any]], threading.Thread]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seen: list[dict[str, Any]] = []
    server = threading.Thread(target=lambda: (serve(theirs, answer, seen), theirs.close()))
    server.start()
    return StdioKeeper(ours, None), seen, server


def requests_of_a_refused_keep(
    answer: Answer, pipes: tuple[tuple[str, int], ...], refusal: str
) -> list[dict[str, Any]]:
    """The requests a `keep_all` made of a keeper that answers with `answer` and refuses it."""
    client, seen, server = connect(answer)
    try:
        with pytest.raises(KeeperError, match=refusal):
            client.keep_all("web", pipes)
    finally:
        client.close(stop_keeper=False)
        server.join()
    return seen


def test_an_old_keeper_is_asked_one_key_at_a_time(pipes: tuple[tuple[str, int], ...]) -> None:
    client, seen, server = connect(old_keeper)
    try:
        keys = client.keep_all("web", pipes)
        again = client.keep_all("web", pipes)
    finally:
        client.close(stop_keeper=False)
        server.join()
    assert keys == again
    assert [request.get("keys", request.get("key")) for request in seen] == [
        list(keys),
        keys[0],
        keys[1],
        keys[0],  # known to be old: no request with several keys again
        keys[1],
    ]


def test_one_key_refused_one_at_a_time_drops_those_kept(
    pipes: tuple[tuple[str, int], ...],
) -> None:
    def refuse_stderr(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "keep" and "/stderr/" in request.get("key", "/stderr/"):
            return {"ok": False, "error": "bad request: out of luck"}
        return {"ok": True}

    seen = requests_of_a_refused_keep(refuse_stderr, pipes, "out of luck")
    stdout_key = seen[1]["key"]
    assert [request["op"] for request in seen] == ["keep", "keep", "keep", "drop"]
    assert seen[-1] == {"op": "drop", "key": stdout_key}


def test_another_refusal_is_not_taken_for_an_old_keeper(
    pipes: tuple[tuple[str, int], ...],
) -> None:
    out_of_memory = {"ok": False, "error": "out of memory"}
    seen = requests_of_a_refused_keep(lambda _request: out_of_memory, pipes, "out of memory")
    assert len(seen) == 1
