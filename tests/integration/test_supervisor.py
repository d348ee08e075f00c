"""The supervisor with real programs in real sandboxes: lifecycle, dependencies, reload, output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from grenadine_sv import helpers
from grenadine_sv.config.loading import load_config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.build import build_supervisor
from grenadine_sv.supervisor.core import StartupError
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    IDLE,
    TICKER,
    children_of,
    pid_alive,
    python_program,
    running_supervisor,
    wait_for,
    wait_state,
)

pytestmark = pytest.mark.root


def ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


async def test_program_is_pid1_of_its_own_namespaces_with_clean_fds(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "ticker", State.RUNNING)
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1"
        assert ns_inode(pid, "mnt") != ns_inode("self", "mnt")
        assert ns_inode(pid, "pid") != ns_inode("self", "pid")
        [program] = children_of(pid)  # PID 1 is the init
        for task in (pid, program):
            assert sorted(int(fd) for fd in os.listdir(f"/proc/{task}/fd")) == [0, 1, 2]
            assert os.readlink(f"/proc/{task}/fd/0") == "/dev/null"
            assert os.readlink(f"/proc/{task}/fd/1").startswith("pipe:")
        await wait_for(lambda: b"tick 3" in sv_dirs.stdout_log("ticker").read_bytes())
    assert not pid_alive(pid)
    assert str(sv_dirs.root) not in Path("/proc/self/mountinfo").read_text()


async def test_crashing_program_backs_off_then_goes_fatal(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(
        '[programs.crasher]\ncommand = ["/bin/sh", "-c", "echo dying >&2; exit 3"]\n'
        "startsecs = 1\nstartretries = 2\n"
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "crasher", State.FATAL, timeout=20)
        machine = sv.programs.runners["crasher"].machine
        states = [state for _, state in machine.history]
        assert states.count(State.BACKOFF) == 2
        backoffs = [t for t, s in machine.history if s == State.BACKOFF]
        restarts = [t for t, s in machine.history if s == State.STARTING]
        # Each retry waits longer than the one before.
        waits = [start - backoff for backoff, start in zip(backoffs, restarts[1:], strict=True)]
        assert waits[1] > waits[0]
        assert "code 3" in machine.reason
        assert b"dying" in (sv_dirs.log_dir / "crasher.err.log").read_bytes()


async def test_program_ignoring_sigterm_is_killed_with_its_children(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(
        "[programs.stubborn]\n"
        'command = ["/bin/sh", "-c", "trap \\"\\" TERM; sleep 1000 & sleep 1000 & wait"]\n'
        "startsecs = 0.2\nstopwaitsecs = 0.5\n"
    )
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "stubborn", State.RUNNING)
        [shell] = children_of(pid)  # the init's only child
        await wait_for(lambda: len(children_of(shell)) == 2)
        children = [shell, *children_of(shell)]
        with capture_logs() as logs:
            state = await sv.programs.runners["stubborn"].stop(10)
        assert state == State.STOPPED
        assert any(entry["event"] == "stop_timeout_kill" for entry in logs)
        assert sv.programs.runners["stubborn"].machine.last_exit == -9
        for child in children:
            assert not pid_alive(child)


async def test_dependencies_start_after_their_dependency_is_ready(sv_dirs: SupervisorDirs):
    port = free_port()
    server = python_program(
        "import signal, socket, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(0.5)\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "signal.pause()\n"
    )
    config = sv_dirs.write_config(
        f"[programs.web]\ncommand = {IDLE}\ndepends_on = ['db']\nstartsecs = 0\n\n"
        f"[programs.db]\ncommand = {server}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}\n'
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "web", State.RUNNING)
        db_ready = next(
            t for t, s in sv.programs.runners["db"].machine.history if s == State.RUNNING
        )
        web_start = next(
            t for t, s in sv.programs.runners["web"].machine.history if s == State.STARTING
        )
        assert web_start >= db_ready
        # Stopping happens in reverse: web before db.
        await sv.operations.stop_programs(["db", "web"])
        db_stop = next(
            t for t, s in sv.programs.runners["db"].machine.history if s == State.STOPPING
        )
        web_stopped = max(
            t for t, s in sv.programs.runners["web"].machine.history if s == State.STOPPED
        )
        assert db_stop >= web_stopped


async def test_reload_applies_only_the_difference(sv_dirs: SupervisorDirs):
    def write(changed_word: str, with_removed: bool, with_added: bool) -> Path:
        tables = [
            f"[programs.same]\ncommand = {IDLE}\nstartsecs = 0\n",
            f"[programs.changing]\ncommand = {IDLE}\nstartsecs = 0\n"
            f'environment = {{ WORD = "{changed_word}" }}\n',
        ]
        if with_removed:
            tables.append(f"[programs.leaving]\ncommand = {IDLE}\nstartsecs = 0\n")
        if with_added:
            tables.append(f"[programs.arriving]\ncommand = {IDLE}\nstartsecs = 0\n")
        return sv_dirs.write_config("\n".join(tables))

    config = write("one", with_removed=True, with_added=False)
    async with running_supervisor(config) as sv:
        same = await wait_state(sv, "same", State.RUNNING)
        changing = await wait_state(sv, "changing", State.RUNNING)
        leaving = await wait_state(sv, "leaving", State.RUNNING)
        write("two", with_removed=False, with_added=True)
        summary = await sv.operations.reload()
        assert summary["changed"] == ["changing"]
        assert summary["removed"] == ["leaving"]
        assert summary["added"] == ["arriving"]
        assert summary["unchanged"] == ["same"]
        assert await wait_state(sv, "same", State.RUNNING) == same
        assert await wait_state(sv, "changing", State.RUNNING) != changing
        await wait_state(sv, "arriving", State.RUNNING)
        assert "leaving" not in sv.programs.runners
        assert not pid_alive(leaving)
        assert pid_alive(same)
        environ = Path(f"/proc/{sv.programs.runners['changing'].machine.pid}/environ").read_bytes()
        assert b"WORD=two" in environ.split(b"\0")


async def test_reload_keeps_the_running_supervisor_settings(sv_dirs: SupervisorDirs):
    """Regression: reload warned that [supervisor] settings need a restart, then adopted
    them; a changed state_dir broke every changed program ("cannot bind-mount / onto
    .../sandbox-root") and reload still exited 0."""
    config = sv_dirs.write_config(
        f'[programs.changing]\ncommand = {IDLE}\nstartsecs = 0\nenvironment = {{ W = "1" }}\n'
    )
    moved = sv_dirs.root / "moved-state"
    async with running_supervisor(config) as sv:
        before = await wait_state(sv, "changing", State.RUNNING)
        text = config.read_text()
        config.write_text(
            text.replace(f'state_dir = "{sv_dirs.state_dir}"', f'state_dir = "{moved}"').replace(
                'W = "1"', 'W = "2"'
            )
        )
        summary = await sv.operations.reload()
        assert summary["changed"] == ["changing"]
        assert summary["supervisor_settings_kept"] == ["state_dir"]
        after = await wait_state(sv, "changing", State.RUNNING)
        assert after != before
        assert sv.programs.config.supervisor.state_dir == sv_dirs.state_dir
        assert not moved.exists()


async def test_output_is_rotated_by_size(sv_dirs: SupervisorDirs):
    chatter = python_program("import time\nfor i in range(400): print('x' * 99)\ntime.sleep(60)")
    config = sv_dirs.write_config(
        f"[programs.chatty]\ncommand = {chatter}\nstartsecs = 0\n"
        "stdout_logfile_maxbytes = 10000\nstdout_logfile_backups = 2\nstopwaitsecs = 1\n"
    )
    log = sv_dirs.stdout_log("chatty")
    async with running_supervisor(config) as sv:
        await wait_state(sv, "chatty", State.RUNNING)
        await wait_for(lambda: Path(f"{log}.2").exists(), what="two rotated backups")
        await wait_for(lambda: log.exists() and log.stat().st_size > 0)
    assert not Path(f"{log}.3").exists()
    for path in (log, Path(f"{log}.1"), Path(f"{log}.2")):
        assert path.stat().st_size <= 10000


async def test_missing_command_is_reported_as_the_programs_error(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(
        '[programs.ghost]\ncommand = ["/no/such/binary"]\nstartretries = 0\n'
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "ghost", State.FATAL)
        assert "/no/such/binary" in sv.programs.runners["ghost"].machine.reason


async def test_control_socket_is_private(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config("")
    async with running_supervisor(config):
        assert sv_dirs.socket.stat().st_mode & 0o777 == 0o600
        assert sv_dirs.state_dir.stat().st_mode & 0o777 == 0o700
    await trio.lowlevel.checkpoint()
    assert not sv_dirs.socket.exists()


async def test_a_launcher_not_built_stops_the_start_saying_how_to_build_it(
    sv_dirs: SupervisorDirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(helpers, "HELPERS_DIR", str(tmp_path))
    config = load_config(sv_dirs.write_config(""))
    with pytest.raises(StartupError, match=r"grenadine-launch is missing.*C compiler"):
        await build_supervisor(config).run()
