"""The stdio keeper (the helper grenadine-keep), run as a real process: its protocol, what it
refuses, the fds it holds and closes, and its exit on its own once no supervisor has come for
its idle period and no program can write to the pipes it holds."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import grenadine_sv.helpers
from grenadine_sv.helpers import helper_path
from grenadine_sv.keeper.client import KEEPER, MAX_MESSAGE, KeeperError, StdioKeeper

IDLE = 0.3
# Long enough that a keeper which ignored a live pipe or a connected supervisor would have
# exited: the negative can only be seen by waiting.
OUTLIVES = IDLE * 10
EXIT_BOUND = 15.0
NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
# More pipes than the usual soft limit on open files.
MANY_PIPES = 1100
SOFT_LIMIT = 1024


@dataclass
class Keeper:
    process: subprocess.Popen[bytes]
    path: Path

    def connect(self) -> StdioKeeper:
        return StdioKeeper(self.raw_connection(), None)

    def raw_connection(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.connect(os.fspath(self.path))
        return conn

    def running_after(self, seconds: float) -> bool:
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@pytest.fixture
def keeper(request: pytest.FixtureRequest) -> Iterator[Keeper]:
    """A keeper process with a short idle period, ended by its pid after the test; an indirect
    parameter is a command that execs it (prlimit, to start it with other limits)."""
    root = Path(tempfile.mkdtemp(prefix="gsv-keep-", dir="/tmp"))
    path = root / "keeper.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(os.fspath(path))
    listener.listen(8)
    process = subprocess.Popen(
        [*getattr(request, "param", ()), helper_path(KEEPER), str(listener.fileno()), str(IDLE)],
        pass_fds=(listener.fileno(),),
    )
    listener.close()
    try:
        yield Keeper(process, path)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        shutil.rmtree(root)


def ask(conn: socket.socket, message: bytes, fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
    """Send one raw request; its reply, decoded, and the fds it carried."""
    socket.send_fds(conn, [message], list(fds))
    data, received, _flags, _address = socket.recv_fds(conn, MAX_MESSAGE, 4)
    return json.loads(data), received


def encode(op: str, key: str | None = None, *, ascii_only: bool = True) -> bytes:
    fields = {"op": op} if key is None else {"op": op, "key": key}
    return json.dumps(fields, ensure_ascii=ascii_only).encode()


def test_keeper_with_hung_up_pipes_exits_once_no_supervisor_came(keeper: Keeper) -> None:
    read_end, write_end = os.pipe()
    supervisor = keeper.connect()
    supervisor.keep("ticker", "stdout", read_end)
    os.close(read_end)
    supervisor.close(stop_keeper=False)  # a supervisor killed for good
    try:
        assert keeper.running_after(OUTLIVES), "a program can still write: the pipe is kept"
    finally:
        os.close(write_end)  # the program is gone
    assert keeper.process.wait(timeout=EXIT_BOUND) == 0


def test_keeper_stays_while_a_supervisor_is_connected(keeper: Keeper) -> None:
    supervisor = keeper.connect()
    try:
        assert keeper.running_after(OUTLIVES), "exited with a supervisor connected"
        assert supervisor.take_all() == {}
    finally:
        supervisor.close(stop_keeper=False)
    assert keeper.process.wait(timeout=EXIT_BOUND) == 0


def test_keeper_idle_period_starts_again_when_a_supervisor_comes(keeper: Keeper) -> None:
    read_end, write_end = os.pipe()
    first = keeper.connect()
    first.keep("ticker", "stdout", read_end)
    os.close(read_end)
    first.close(stop_keeper=False)
    second = keeper.connect()  # the next supervisor, within the idle period
    os.close(write_end)
    try:
        taken = second.take_all()
        assert len(taken) == 1, "what the first supervisor deposited is still held"
        for fd in taken.values():
            os.close(fd)
        assert keeper.running_after(OUTLIVES)
    finally:
        second.close(stop_keeper=False)
    assert keeper.process.wait(timeout=EXIT_BOUND) == 0


def test_supervisor_starts_the_compiled_keeper_and_stops_it() -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="gsv-keep-", dir="/tmp"))
    supervisor = StdioKeeper.connect_or_start(state_dir)
    pid = supervisor.pid
    try:
        assert pid is not None
        assert os.readlink(f"/proc/{pid}/exe") == helper_path(KEEPER)
        assert Path(f"/proc/{pid}/comm").read_text() == "grenadine-keep\n"
    finally:
        supervisor.close(stop_keeper=True)  # waits for it by its pid, kills it if it stays
        shutil.rmtree(state_dir)


def test_a_keeper_not_built_is_a_keeper_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grenadine_sv.helpers, "HELPERS_DIR", os.fspath(tmp_path))
    with pytest.raises(KeeperError, match=r"grenadine-keep is missing.*C compiler"):
        StdioKeeper.connect_or_start(tmp_path)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"   ",
        b"{",
        b"not json",
        b'{"op": "list",}',
        b'{"op": "list" "key": "a"}',
        b'{"op": "list"} {}',
        b'{"op": "list", "x": tru}',
        b'{"op": "list", "x": 01}',
        b'{"op": "list", "x": [1,]}',
        b'{"op": "li\\x"}',
        b'{"op": "list", "x": "\\ud800"}',
        b'{"op": "list", "x": "\\udc00\\ud800"}',
        b'{"op": "list", "x": "\xff"}',
        b'{"op": "list", "x": "\xed\xa0\x80"}',
        b'{"op": "list", "x": "tab\there"}',
        b'{"op": "list", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"op": "list", "x": "' + b"x" * MAX_MESSAGE + b'"}',
        b"[1, 2]",
        b'"list"',
        b"null",
        b"42",
        b'{"op": 7}',
        b'{"op": "fly"}',
        b'{"key": "a"}',
        b'{"op": "drop"}',
        b'{"op": "take", "key": "missing"}',
        b'{"op": "take", "key": ["a"]}',
        b'{"op": "keep", "key": "a"}',
        b'{"op": "keep", "keys": ["a"]}',
        b'{"op": "keep", "keys": ["a", 1]}',
        b'{"op": "keep", "keys": "a"}',
        b'{"op": "keep", "keys": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
        b'{"op": "keep", "keys": ["a",]}',
    ],
    ids=lambda message: repr(message[:40]),
)
def test_keeper_answers_a_bad_request_and_serves_on(keeper: Keeper, message: bytes) -> None:
    with keeper.raw_connection() as conn:
        if message == b"":
            # An empty message reads as the end of the connection: nothing to answer.
            conn.send(message)
        else:
            answer, fds = ask(conn, message)
            assert fds == []
            assert answer["ok"] is False
            assert answer["error"].startswith("bad request: ")
            assert set(answer) == {"ok", "error"}
    with keeper.raw_connection() as conn:
        assert ask(conn, encode("list")) == ({"ok": True, "keys": []}, [])


def test_keeper_reads_any_json_object(keeper: Keeper) -> None:
    read_end, write_end = os.pipe()
    with keeper.raw_connection() as conn:
        keep = (
            b' \n\t{ "x": [1, -2.5e3, {"y": null}, true, false, "\\u00e9", 0, -0.0],'
            b' "key" : "\\u006b",\r"op":"keep"}\n'
        )
        assert ask(conn, keep, [read_end]) == ({"ok": True}, [])
        assert ask(conn, b'{"op": "take", "op": "list"}') == ({"ok": True, "keys": ["k"]}, [])
        answer, fds = ask(conn, b'{"key": "k", "op": "take"}')
        assert answer == {"ok": True}
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(read_end).st_ino]
    for fd in (*fds, read_end, write_end):
        os.close(fd)


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "utf8"])
def test_keys_round_trip_through_keep_list_and_take(keeper: Keeper, ascii_only: bool) -> None:
    names = [
        'say "hi"',
        "back\\slash",
        "café",
        "日本",
        "emoji 😀",
        "tab\tnew\nline",
        "nul\x00",
        "/",
    ]
    pipes = {f"{name}/stdout/{index}": os.pipe() for index, name in enumerate(names)}
    with keeper.raw_connection() as conn:
        for key, (read_end, _write_end) in pipes.items():
            assert ask(conn, encode("keep", key, ascii_only=ascii_only), [read_end])[0]["ok"]
        assert ask(conn, encode("list")) == ({"ok": True, "keys": sorted(pipes)}, [])
        for key, (read_end, _write_end) in pipes.items():
            answer, fds = ask(conn, encode("take", key, ascii_only=ascii_only))
            assert answer == {"ok": True}
            assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(read_end).st_ino]
            os.close(fds[0])
    for read_end, write_end in pipes.values():
        os.close(read_end)
        os.close(write_end)


def test_keeper_holds_several_pipes_kept_in_one_request(keeper: Keeper) -> None:
    pipes = [os.pipe() for _ in range(3)]
    keys = ["b/stderr/1", "a/stdout/2", "b/stderr/1"]  # the last of a key twice is held
    with keeper.raw_connection() as conn:
        keep = json.dumps({"op": "keep", "keys": keys, "key": "ignored"}).encode()
        assert ask(conn, keep, [read_end for read_end, _write_end in pipes]) == ({"ok": True}, [])
        assert ask(conn, encode("list")) == ({"ok": True, "keys": sorted(set(keys))}, [])
        for key, (read_end, _write_end) in zip(keys[1:], pipes[1:], strict=True):
            answer, fds = ask(conn, encode("take", key))
            assert answer == {"ok": True}
            assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(read_end).st_ino]
            os.close(fds[0])
    for fd in (fd for pipe in pipes for fd in pipe):
        os.close(fd)


def test_the_client_keeps_a_programs_pipes_in_one_request(keeper: Keeper) -> None:
    supervisor = keeper.connect()
    (out_read, out_write), (err_read, err_write) = os.pipe(), os.pipe()
    try:
        keys = supervisor.keep_all("web", (("stdout", out_read), ("stderr", err_read)))
        assert keys == (
            f"web/stdout/{os.fstat(out_read).st_ino}",
            f"web/stderr/{os.fstat(err_read).st_ino}",
        )
        taken = supervisor.take_all()
    finally:
        supervisor.close(stop_keeper=True)
    assert sorted(taken) == sorted(keys)
    for fd in (*taken.values(), out_read, out_write, err_read, err_write):
        os.close(fd)


def test_keeper_closes_every_fd_it_does_not_hold(keeper: Keeper) -> None:
    with keeper.raw_connection() as conn:
        ask(conn, encode("list"))
        before = keeper.open_fds()
        first, second, third = os.pipe(), os.pipe(), os.pipe()
        assert ask(conn, encode("list"), [first[0]])[0]["ok"], "an fd a request did not need"
        assert not ask(conn, encode("keep", "k"), [first[0], second[0]])[0]["ok"]
        two_keys = json.dumps({"op": "keep", "keys": ["k", "l"]}).encode()
        assert not ask(conn, two_keys, [first[0], second[0], third[0]])[0]["ok"]
        assert not ask(conn, two_keys, [first[0]])[0]["ok"]
        assert not ask(conn, b"{not json", [first[0]])[0]["ok"]
        assert ask(conn, encode("drop", "k"), [first[0], second[0], third[0]])[0]["ok"]
        assert keeper.open_fds() == before
        assert ask(conn, encode("keep", "k"), [first[0]])[0]["ok"]
        assert ask(conn, encode("keep", "k"), [second[0]])[0]["ok"], "replaces, closes the first"
        assert keeper.open_fds() == before + 1
        assert ask(conn, encode("drop", "k"))[0]["ok"]
        assert keeper.open_fds() == before
    for fd in (*first, *second, *third):
        os.close(fd)


def test_keeper_survives_a_supervisor_gone_before_its_reply(keeper: Keeper) -> None:
    read_end, write_end = os.pipe()
    with keeper.raw_connection() as conn:
        ask(conn, encode("keep", "k"), [read_end])
        before = keeper.open_fds()
    for _ in range(20):
        with keeper.raw_connection() as conn:
            conn.send(encode("take", "k"))
    with keeper.raw_connection() as conn:
        assert ask(conn, encode("list")) == ({"ok": True, "keys": ["k"]}, [])
        assert keeper.open_fds() == before
    os.close(read_end)
    os.close(write_end)


REFUSED_CLIENT = """
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(sys.argv[1])
try:
    conn.send(b'{"op": "list"}')
    print("answered" if conn.recv(65536) else "refused")
except OSError:
    print("refused")
"""


@pytest.mark.root
def test_keeper_refuses_a_connection_from_another_uid(keeper: Keeper) -> None:
    os.chmod(keeper.path.parent, 0o755)
    os.chmod(keeper.path, 0o777)
    # A kept pipe whose write end is open keeps the keeper up past its 0.3 s idle period,
    # however long the other user's interpreter takes to start.
    read_end, write_end = os.pipe()
    with keeper.raw_connection() as conn:
        assert ask(conn, encode("keep", "k"), [read_end]) == ({"ok": True}, [])
    os.close(read_end)
    try:
        refused = subprocess.run(
            [*AS_NOBODY, sys.executable, "-I", "-S", "-c", REFUSED_CLIENT, os.fspath(keeper.path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (refused.returncode, refused.stdout) == (0, "refused\n"), refused.stderr
        with keeper.raw_connection() as conn:
            assert ask(conn, encode("list")) == ({"ok": True, "keys": ["k"]}, [])
    finally:
        os.close(write_end)


@pytest.mark.parametrize("keeper", [("prlimit", f"--nofile={SOFT_LIMIT}:")], indirect=True)
def test_keeper_holds_more_pipes_than_the_soft_fd_limit(keeper: Keeper) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < MANY_PIPES + 100:
        pytest.skip(f"the hard limit on open files ({hard}) is below {MANY_PIPES + 100}")
    keys = []
    with keeper.raw_connection() as conn:
        for index in range(MANY_PIPES):
            read_end, write_end = os.pipe()
            keys.append(f"p{index}/stdout/{os.fstat(read_end).st_ino}")
            try:
                assert ask(conn, encode("keep", keys[-1]), [read_end]) == ({"ok": True}, [])
            finally:
                os.close(read_end)
                os.close(write_end)
        assert ask(conn, encode("list")) == ({"ok": True, "keys": sorted(keys)}, [])
        answer, fds = ask(conn, encode("take", keys[-1]))
        assert answer == {"ok": True}
        assert len(fds) == 1
        os.close(fds[0])
    assert keeper.open_fds() > MANY_PIPES
    limits = Path(f"/proc/{keeper.process.pid}/limits").read_text()
    assert f"Max open files {hard} {hard}" in " ".join(limits.split()), "its soft limit raised"


def test_the_client_reads_a_list_longer_than_a_request_may_be(keeper: Keeper) -> None:
    """Long program names: the keys of 700 pipes take more than MAX_MESSAGE bytes to list."""
    supervisor = keeper.connect()
    kept: list[str] = []
    try:
        for index in range(700):
            read_end, write_end = os.pipe()
            try:
                kept.append(supervisor.keep(f"{'p' * 90}{index}", "stdout", read_end))
            finally:
                os.close(read_end)
                os.close(write_end)
        taken = supervisor.take_all()
    finally:
        supervisor.close(stop_keeper=True)
    for fd in taken.values():
        os.close(fd)
    assert len(json.dumps(kept)) > MAX_MESSAGE
    assert sorted(taken) == sorted(kept)
