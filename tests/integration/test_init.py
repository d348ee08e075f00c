"""The init (Debian's tini) as PID 1 of every sandbox: signals, exit statuses, zombies, CRIU."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox.init import INIT_COMM, TINI
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    PYTHON,
    children_of,
    counter_command,
    hit,
    python_program,
    running_supervisor,
    wait_for,
    wait_state,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not os.access(TINI, os.X_OK), reason=f"{TINI} (Debian's tini) is missing"),
]

# Long enough that a stop ending in SIGKILL after stopwaitsecs cannot pass for a prompt one.
PATIENT = "stopwaitsecs = 60\nstartsecs = 0.2\n"


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def nspid(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return [int(field) for field in line.split()[1:]]


async def stop_and_read_exit(sv_dirs: SupervisorDirs, name: str, command: str) -> int:
    """Start `command` under the init, check the tree, stop it; returns its last exit."""
    config = sv_dirs.write_config(f"[programs.{name}]\ncommand = {command}\n{PATIENT}")
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, name, State.RUNNING)
        assert comm(pid) == INIT_COMM
        assert nspid(pid)[-1] == 1
        [child] = children_of(pid)
        assert nspid(child)[-1] == 2, "the program is the init's child, PID 2 of the sandbox"
        with capture_logs() as logs:
            assert await sv.programs.runners[name].stop(15) == State.STOPPED
        assert not any(entry["event"] == "stop_timeout_kill" for entry in logs)
        [exited] = [entry for entry in logs if entry["event"] == "program_exited"]
        assert exited["exit"] == "signal TERM"
        return sv.programs.runners[name].machine.last_exit or 0


async def test_http_server_without_a_sigterm_handler_stops_at_the_stop_signal(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    command = json.dumps([PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)])
    assert await stop_and_read_exit(sv_dirs, "http", command) == -signal.SIGTERM


async def test_sleep_stops_at_the_stop_signal(sv_dirs: SupervisorDirs):
    assert await stop_and_read_exit(sv_dirs, "sleeper", '["sleep", "1000"]') == -signal.SIGTERM


async def test_without_the_init_the_program_is_pid_1_and_ignores_sigterm(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(
        '[programs.sleeper]\ncommand = ["sleep", "1000"]\ninit = false\n'
        "startsecs = 0.2\nstopwaitsecs = 0.3\n"
    )
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "sleeper", State.RUNNING)
        assert comm(pid) == "sleep"
        assert nspid(pid)[-1] == 1
        with capture_logs() as logs:
            assert await sv.programs.runners["sleeper"].stop(10) == State.STOPPED
        assert any(entry["event"] == "stop_timeout_kill" for entry in logs)
        assert sv.programs.runners["sleeper"].machine.last_exit == -signal.SIGKILL


async def test_exit_codes_and_signals_of_the_program_reach_the_supervisor(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(
        f"[programs.three]\ncommand = {python_program('raise SystemExit(3)')}\n"
        'autorestart = "never"\nstartsecs = 0\n'
        f"[programs.usr2]\ncommand = {python_program('import os; os.kill(os.getpid(), 12)')}\n"
        'autorestart = "never"\nstartsecs = 0\n'
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "three", State.EXITED)
        await wait_state(sv, "usr2", State.EXITED)
        assert sv.programs.runners["three"].machine.last_exit == 3
        assert sv.programs.runners["three"].machine.reason == "exited with code 3"
        assert sv.programs.runners["usr2"].machine.last_exit == -signal.SIGUSR2
        assert sv.programs.runners["usr2"].machine.reason == "exited with signal USR2"


async def test_orphans_of_the_program_are_reaped_by_the_init(sv_dirs: SupervisorDirs):
    # The program's children exit at once; their children (orphans re-parented to PID 1)
    # exit a moment later. Without an init nobody would wait for them.
    program = python_program(
        "import subprocess, time\n"
        "for _ in range(3):\n"
        "    subprocess.run(['sh', '-c', 'sleep 0.2 &'])\n"
        "print('spawned', flush=True)\n"
        "time.sleep(1000)\n"
    )
    config = sv_dirs.write_config(f"[programs.parent]\ncommand = {program}\nstartsecs = 0.2\n")
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "parent", State.RUNNING)
        log = sv_dirs.stdout_log("parent")
        await wait_for(lambda: log.exists() and b"spawned" in log.read_bytes())

        def only_the_program_is_left() -> bool:
            return len(children_of(pid)) == 1 and not children_of(children_of(pid)[0])

        await wait_for(only_the_program_is_left, what="the orphaned sleeps reaped")
        await sv.operations.stop_programs(["parent"])


@pytest.mark.criu
async def test_the_init_is_checkpointed_and_restored_with_the_program(sv_dirs: SupervisorDirs):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.counter]\ncommand = {counter_command(port)}\n{PATIENT}"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        for _ in range(3):
            hit(port)
        [result] = await sv.operations.checkpoint_programs(["counter"], stop=True)
        assert result.get("error") is None, result
        await wait_state(sv, "counter", State.STOPPED)
        [image] = store.list("counter")
        assert image.init
        assert image.comm.startswith("python"), image

        await sv.operations.restore_program("counter", "latest")
        pid = await wait_state(sv, "counter", State.RUNNING)
        assert comm(pid) == INIT_COMM
        assert hit(port) == 4, "the counter kept its hits"
        with capture_logs() as logs:
            assert await sv.programs.runners["counter"].stop(15) == State.STOPPED
        assert not any(entry["event"] == "stop_timeout_kill" for entry in logs)
        assert sv.programs.runners["counter"].machine.last_exit == 0


def test_tini_is_debians_static_build_at_its_packaged_path():
    assert shutil.which("tini-static") == TINI
    with open(TINI, "rb") as binary:
        elf = binary.read(4096)
    assert b"/ld-linux" not in elf, "a statically linked tini has no program interpreter"
