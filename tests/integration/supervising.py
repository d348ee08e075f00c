"""Helpers for tests that run a real Supervisor in the test's own trio loop."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from grenadine_sv.config.loading import load_config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.build import build_supervisor
from grenadine_sv.supervisor.core import Supervisor

PYTHON = sys.executable
# The example service whose only state is an in-memory hit counter.
COUNTER_SERVICE = Path(__file__).resolve().parents[2] / "examples" / "python-counter" / "counter.py"


def python_program(code: str) -> str:
    """A TOML command array running `code` with this interpreter, unbuffered.

    JSON string escapes are valid TOML, so json.dumps writes the array."""
    return json.dumps([PYTHON, "-u", "-c", code])


def counter_command(port: int) -> str:
    """A TOML command array running the example counter service on `port`."""
    return json.dumps([PYTHON, "-u", os.fspath(COUNTER_SERVICE), "--port", str(port)])


def hit(port: int) -> int:
    """GET the counter service once; returns its count of hits."""
    return int(counter_reply(port)["hits"])


def counter_reply(port: int) -> dict[str, float]:
    """GET the counter service once; returns its reply: hits, and when the process started."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    reply: dict[str, float] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return reply


# A service that exits cleanly on SIGTERM and prints a line every 0.1 s.
TICKER = python_program(
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "n = 0\n"
    "while True:\n"
    "    print('tick', n); n += 1; time.sleep(0.1)\n"
)

# Waits for SIGTERM, printing nothing.
IDLE = python_program(
    "import signal, sys\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('ready')\n"
    "signal.pause()\n"
)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    try:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"not true within {timeout}s: {what or predicate}") from None


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll `predicate` until it holds, outside trio; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or predicate}")
        time.sleep(0.05)


async def wait_state(sv: Supervisor, name: str, state: State, timeout: float = 15.0) -> int:
    """Wait until `name` is in `state`; return its pid (0 when it has none)."""
    runners = sv.programs.runners
    await wait_for(
        lambda: name in runners and runners[name].state == state,
        timeout,
        f"{name} {state.value} (now {runners[name].state.value if name in runners else '-'})",
    )
    return runners[name].machine.pid or 0


@asynccontextmanager
async def running_supervisor(config_path: Path) -> AsyncIterator[Supervisor]:
    """Run the supervisor on this configuration; on leaving, shut it down like SIGTERM would."""
    config = load_config(config_path)
    supervisor = build_supervisor(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        # On an exception the nursery cancels the supervisor, which then kills its programs.
        yield supervisor
        supervisor.request_shutdown()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        # A thread may end between the listing and the read.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.extend(int(child) for child in (task / "children").read_text().split())
    return found
