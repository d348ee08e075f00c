"""The CRIU options of [programs.NAME.checkpoint] with real CRIU: file locks, network lock,
established TCP connections, and errors that say which key to change."""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from structlog.testing import capture_logs

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.core import Supervisor
from tests.conftest import SupervisorDirs, free_port
from tests.integration.services import ask, ping, pong_client, sqlite_counter
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]


def sqlite_program(sv_dirs: SupervisorDirs, port: int, policy: str = "") -> str:
    database = sv_dirs.root / "data" / "counter.db"
    database.parent.mkdir()
    return (
        f"[programs.db]\ncommand = {sqlite_counter(str(database), port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\nbinds = ["{database.parent}"]\n'
        f"[programs.db.checkpoint]\n{policy}"
    )


async def test_a_service_holding_sqlite_locks_checkpoints_and_restores_by_default(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    config = sv_dirs.write_config(sqlite_program(sv_dirs, port))
    async with running_supervisor(config) as sv:
        await wait_state(sv, "db", State.RUNNING)
        rows, served = ask(port)
        assert ask(port) == (rows + 1, served + 1)
        [entry] = await sv.operations.checkpoint_programs(["db"], stop=True)
        assert entry["ok"]
        await sv.operations.restore_program("db", "latest")
        await wait_state(sv, "db", State.RUNNING)
        # The database and the count in memory both came back.
        assert ask(port) == (rows + 2, served + 2)


async def test_without_file_locks_the_error_names_the_key_and_the_program_runs_on(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    config = sv_dirs.write_config(sqlite_program(sv_dirs, port, "file_locks = false\n"))
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "db", State.RUNNING)
        rows, served = ask(port)
        with pytest.raises(ControlError) as failure:
            await sv.operations.checkpoint_programs(["db"], stop=True)
        message = str(failure.value)
        assert message.index("file locks are hold") < message.index("to fix:")
        assert "set checkpoint.file_locks = true" in message
        assert sv.programs.runners["db"].machine.pid == pid
        assert ask(port) == (rows + 1, served + 1)


async def accepted(listener: socket.socket) -> socket.socket:
    with trio.fail_after(10):
        while True:
            try:
                peer, _ = listener.accept()
            except BlockingIOError:
                await trio.sleep(0.02)
                continue
            peer.setblocking(True)
            peer.settimeout(10)
            return peer


@asynccontextmanager
async def connected_client(
    sv_dirs: SupervisorDirs, checkpoint: str = ""
) -> AsyncIterator[tuple[Supervisor, socket.socket, socket.socket]]:
    """Program `client` (services.pong_client) running with these [checkpoint] keys and
    connected to this test: yields the supervisor, the test's end of the connection and the
    listener the client connected to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        config = sv_dirs.write_config(
            f"[programs.client]\ncommand = {pong_client(port)}\nstartsecs = 0.2\n"
            f"[programs.client.checkpoint]\n{checkpoint}"
        )
        async with running_supervisor(config) as sv:
            await wait_state(sv, "client", State.RUNNING)
            with await accepted(listener) as peer:
                yield sv, peer, listener


async def test_an_established_tcp_connection_survives_checkpoint_stop_and_restore(
    sv_dirs: SupervisorDirs,
):
    async with connected_client(sv_dirs, "tcp_established = true\n") as (sv, peer, listener):
        assert [ping(peer) for _ in range(3)] == [1, 2, 3]
        [entry] = await sv.operations.checkpoint_programs(["client"], stop=True)
        assert entry["ok"]
        await wait_state(sv, "client", State.STOPPED)
        await sv.operations.restore_program("client", "latest")
        await wait_state(sv, "client", State.RUNNING)
        # The same connection, the same count: nothing was reset or reconnected.
        assert ping(peer) == 4
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.skipif(shutil.which("iptables") is not None, reason="iptables is installed here")
async def test_the_iptables_lock_without_iptables_fails_naming_network_lock(
    sv_dirs: SupervisorDirs,
):
    keys = 'tcp_established = true\nnetwork_lock = "iptables"\n'
    async with connected_client(sv_dirs, keys) as (sv, peer, _listener):
        assert ping(peer) == 1
        with pytest.raises(ControlError) as failure:
            await sv.operations.checkpoint_programs(["client"], stop=True)
        message = str(failure.value)
        # The cause first: the shell's line explains CRIU's "exited, status=127".
        assert message.startswith("client: criu dump failed: sh: 1: iptables: not found")
        assert message.index("exited, status=127") < message.index("Iptables config")
        assert 'set checkpoint.network_lock = "auto"' in message
        assert ping(peer) == 2, "the program and its connection are as they were"


async def test_a_connection_without_tcp_established_fails_naming_the_key(
    sv_dirs: SupervisorDirs,
):
    async with connected_client(sv_dirs) as (sv, peer, _listener):
        with pytest.raises(ControlError) as failure:
            await sv.operations.checkpoint_programs(["client"], stop=False)
        assert "set checkpoint.tcp_established = true" in str(failure.value)
        assert ping(peer) == 1


async def test_a_unix_socket_renamed_after_bind_is_named_at_checkpoint(sv_dirs: SupervisorDirs):
    # haproxy's way: bind admin.sock.PID.tmp, then rename it to admin.sock.
    program = python_program(
        "import os, signal, socket, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "kept, moved = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)\n"
        "kept.bind('/tmp/stats.sock'); kept.listen()\n"
        "moved.bind('/tmp/admin.sock.1.tmp'); moved.listen()\n"
        "os.rename('/tmp/admin.sock.1.tmp', '/tmp/admin.sock')\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    config = sv_dirs.write_config(f"[programs.proxy]\ncommand = {program}\nstartsecs = 0.2\n")
    log = sv_dirs.stdout_log("proxy")
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "proxy", State.RUNNING)
            await wait_for(lambda: log.exists() and b"ready" in log.read_bytes())
            [entry] = await sv.operations.checkpoint_programs(["proxy"], stop=False)
            assert entry["ok"]
    [warning] = [e for e in logs if e["event"] == "unix_socket_moved_after_bind"]
    assert warning["socket"] == "/tmp/admin.sock.1.tmp"
    assert warning["log_level"] == "warning"
