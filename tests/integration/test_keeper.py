"""The stdio keeper (keeper/holder.py), run as a real process: it exits on its own once no
supervisor has come for its idle period and no program can write to the pipes it holds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grenadine_sv.keeper.client import HOLDER, StdioKeeper

IDLE = 0.3
# Long enough that a keeper which ignored a live pipe or a connected supervisor would have
# exited: the negative can only be seen by waiting.
OUTLIVES = IDLE * 10
EXIT_BOUND = 15.0


@dataclass
class Keeper:
    process: subprocess.Popen[bytes]
    path: Path

    def connect(self) -> StdioKeeper:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.connect(os.fspath(self.path))
        return StdioKeeper(conn, None)

    def running_after(self, seconds: float) -> bool:
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    """A keeper process with a short idle period, ended by its pid after the test."""
    root = Path(tempfile.mkdtemp(prefix="gsv-keep-", dir="/tmp"))
    path = root / "keeper.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(os.fspath(path))
    listener.listen(8)
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", HOLDER, str(listener.fileno()), str(IDLE)],
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
