"""supervisorctl's habits: signal, avail, reread and update, clear, maintail, shutdown, the
ctl shell (one command, and a session on stdin), colours only on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess

import pytest

from tests.conftest import SupervisorDirs
from tests.integration.supervising import python_program, wait_until
from tests.integration.terminal import read_terminal
from tests.integration.test_cli import (
    GRENADINE_SV,
    IDLE,
    SupervisorProcess,
    supervisor,
)

__all__ = ["supervisor"]

pytestmark = pytest.mark.root

# Prints "hup" on each SIGHUP, "tick" once at start.
HUPPER = python_program(
    "import signal, sys\n"
    "signal.signal(signal.SIGHUP, lambda *a: print('hup', flush=True))\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "print('tick', flush=True)\n"
    "while True: signal.pause()\n"
)


def test_signal_clear_avail_reread_update_and_maintail(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    programs = f"[programs.hupper]\ncommand = {HUPPER}\nstartsecs = 0\n\n"
    sv_dirs.write_config(programs)
    supervisor.start()
    supervisor.wait_running("hupper")
    log = sv_dirs.stdout_log("hupper")
    wait_until(lambda: log.exists() and "tick" in log.read_text(), 10.0, "tick logged")

    assert supervisor.cli("signal", "HUP", "hupper").stdout == "hupper: HUP sent\n"
    wait_until(lambda: "hup" in log.read_text().split(), 10.0, "hup logged")
    assert supervisor.cli("signal", "hupper", "SIGHUP").stdout == "hupper: HUP sent\n"
    supervisor.cli("signal", "NOPE", "hupper", code=2)

    assert supervisor.cli("clear", "hupper").stdout == "hupper: logs cleared\n"
    assert log.read_text() == ""

    sv_dirs.write_config(programs + f"[programs.later]\ncommand = {IDLE}\nautostart = false\n")
    assert supervisor.cli("reread").stdout == "later: would be added\n"
    avail = supervisor.cli("avail").stdout.split("\n")
    assert avail[0].split() == ["hupper", "in", "use", "auto", "RUNNING"]
    assert avail[1].split() == ["later", "avail", "manual"]
    assert "later" not in supervisor.status()  # reread changed nothing
    assert supervisor.cli("update").stdout == "added: later\n"
    assert supervisor.status()["later"]["state"] == "STOPPED"

    main_log = sv_dirs.log_dir / "grenadine-sv.log"
    lines = supervisor.cli("maintail", "-n", "3").stdout.splitlines()
    assert len(lines) == 3
    assert lines == main_log.read_text().splitlines()[-3:]
    events = [json.loads(line)["event"] for line in main_log.read_text().splitlines()]
    assert "supervisor_started" in events
    assert "program_signalled" in events


def test_ctl_runs_one_command_or_a_session(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    pid = supervisor.wait_running("idle")["idle"]
    assert supervisor.cli("ctl", "pid", "idle").stdout == f"{pid}\n"
    session = subprocess.run(
        [GRENADINE_SV, "-c", str(sv_dirs.config), "ctl"],
        input="status\npid idle\nstauts\nexit\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert session.returncode == 0, session
    assert "idle" in session.stdout
    assert f"{pid}\n" in session.stdout
    assert "did you mean 'status'?" in session.stderr


def test_status_is_coloured_on_a_terminal_only(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    supervisor.wait_running("idle")
    assert "\033[" not in supervisor.cli("status").stdout
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    command = subprocess.Popen(
        [GRENADINE_SV, "-c", str(sv_dirs.config), "status"],
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    os.close(follower)
    output = read_terminal(leader, command, 30)
    assert command.wait(10) == 0
    assert b"\033[32mRUNNING\033[0m" in output, output
