"""The command line's contract, end to end: one exit code per outcome for every command,
-c anywhere, `pid` and the pid file, `checkpoint --all`, clients that ignore SIGUSR1, status
details, reload's report and its log, and `check`'s warnings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from grenadine_sv.host.warnings import host_capabilities
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import wait_until
from tests.integration.test_cli import (
    GRENADINE_SV,
    IDLE,
    SupervisorProcess,
    memcached_program,
    needs_criu,
    run_cli,
    supervisor,
)

__all__ = ["needs_criu", "supervisor"]

pytestmark = pytest.mark.root

UNKNOWN = "nosuch"


def log_events(supervisor: SupervisorProcess) -> list[dict[str, object]]:
    events = []
    for line in supervisor.log().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def test_an_unknown_program_is_exit_2_for_every_command(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    supervisor.wait_running("idle")
    for args in (
        ["status", UNKNOWN],
        ["start", UNKNOWN],
        ["stop", UNKNOWN],
        ["restart", UNKNOWN],
        ["checkpoint", UNKNOWN],
        ["restore", UNKNOWN, "latest"],
        ["prune", UNKNOWN],
        ["logs", UNKNOWN],
        ["tail", UNKNOWN],
        ["images", UNKNOWN],
        ["pid", UNKNOWN],
    ):
        done = supervisor.cli(*args, code=2)
        assert f"no such program: {UNKNOWN}" in done.stderr, (args, done.stderr)
    as_json = json.loads(supervisor.cli("status", "--json", UNKNOWN, code=2).stdout)
    assert as_json == {"error": f"status failed: no such program: {UNKNOWN}", "exit_code": 2}
    # bad usage of options is 2 as well
    supervisor.cli("prune", "idle", "--keep", "-1", code=2)
    supervisor.cli("checkpoint", code=2)
    supervisor.cli("restore", "idle", "no-such-image", code=2)


def test_config_option_after_the_command(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    supervisor.wait_running("idle")
    done = run_cli("status", "-c", str(sv_dirs.config))
    assert done.returncode == 0, done
    assert done.stdout.startswith("idle ")


def test_pid_pid_file_and_a_client_that_ignores_usr1(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    supervisor.start()
    idle = supervisor.wait_running("idle")["idle"]
    assert supervisor.cli("pid").stdout == f"{supervisor.pid}\n"
    assert (sv_dirs.state_dir / "grenadine-sv.pid").read_text() == f"{supervisor.pid}\n"
    assert supervisor.cli("pid", "idle").stdout == f"{idle}\n"
    assert supervisor.cli("pid", "all").stdout == f"idle {idle}\n"
    supervisor.cli("stop", "idle")
    assert "idle is STOPPED" in supervisor.cli("pid", "idle", code=1).stderr

    follower = subprocess.Popen(
        [GRENADINE_SV, "logs", "-f", "idle", "-c", str(sv_dirs.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: follower_started(follower.pid), 20.0, "logs -f ignores SIGUSR1")
        os.kill(follower.pid, signal.SIGUSR1)
        with pytest.raises(subprocess.TimeoutExpired):
            follower.wait(0.5)  # a bounded look: it must still be there, not "long enough"
    finally:
        follower.terminate()
        follower.wait(10)
    assert follower.returncode == -signal.SIGTERM

    supervisor.stop()
    assert not (sv_dirs.state_dir / "grenadine-sv.pid").exists()
    done = run_cli("pid", "-c", str(sv_dirs.config))
    assert done.returncode == 3


def follower_started(pid: int) -> bool:
    """True once the process has set SIGUSR1 to ignored (bit 10 of SigIgn)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))
    return False


@pytest.mark.criu
@pytest.mark.usefixtures("needs_criu")
def test_checkpoint_all_does_what_usr1_does(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(
        memcached_program("cache", port, "on_signal = true")
        + f"\n[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n"
        + f"\n[programs.later]\ncommand = {IDLE}\nautostart = false\n"
        + "[programs.later.checkpoint]\non_signal = true\n"
    )
    supervisor.start()
    supervisor.wait_running("cache", "idle")
    lines = supervisor.cli("checkpoint", "--all").stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("cache: checkpoint ")
    assert lines[1] == "later: skipped (STOPPED, not RUNNING)"
    images = json.loads(supervisor.cli("images", "--json").stdout)
    assert [(i["program"], i["trigger"]) for i in images] == [("cache", "manual")]
    supervisor.cli("checkpoint", "--all", "idle", code=2)


def test_status_shows_a_crash_with_its_signal_and_exits_1_when_fatal(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(
        f"[programs.crashy]\ncommand = {IDLE}\nstartsecs = 0\n\n"
        f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    supervisor.start()
    first = supervisor.wait_running("crashy", "idle")["crashy"]
    os.kill(first, signal.SIGKILL)  # from outside its PID namespace: delivered
    wait_until(
        lambda: supervisor.status()["crashy"]["restarts"] == 1, 20.0, "crashy restarted once"
    )
    supervisor.wait_running("crashy")
    line = supervisor.cli("status", "crashy").stdout
    assert "restarts 1, last exit signal KILL" in line, line
    exits = [e for e in log_events(supervisor) if e.get("event") == "program_exited"]
    assert [(e["program"], e["signal"], e["pid"]) for e in exits] == [("crashy", "KILL", first)]

    sv_dirs.write_config(
        f'[programs.crashy]\ncommand = ["/nonexistent/binary"]\nstartretries = 0\n\n'
        f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    reload = supervisor.cli("reload", code=1).stdout.splitlines()
    assert reload[0] == "changed: crashy"
    assert reload[1].startswith("failed: crashy (FATAL: ")
    assert any(e.get("event") == "reload_programs_failed" for e in log_events(supervisor))
    supervisor.cli("status", code=1)
    supervisor.cli("status", "idle", code=0)


def test_reload_keeps_order_leaves_a_stopped_program_stopped_and_logs_failures(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    programs = "".join(
        f"[programs.{name}]\ncommand = {IDLE}\nstartsecs = 0\n\n" for name in ("a", "b", "c")
    )
    sv_dirs.write_config(programs)
    supervisor.start()
    supervisor.wait_running("a", "b", "c")
    supervisor.cli("stop", "b")
    sv_dirs.write_config(programs.replace("startsecs = 0\n", 'startsecs = 0\numask = "077"\n'))
    lines = supervisor.cli("reload").stdout.splitlines()
    assert lines == [
        "changed: a",
        "changed: b",
        "changed: c",
        "left stopped: b (stopped by hand before the reload)",
    ]
    entries = json.loads(supervisor.cli("status", "--json").stdout)
    states = [(e["name"], e["state"]) for e in entries]
    assert states == [("a", "RUNNING"), ("b", "STOPPED"), ("c", "RUNNING")]

    sv_dirs.config.write_text(sv_dirs.config.read_text() + '\n[programs.d]\nstartsecs = "x"\n')
    failed = supervisor.cli("reload", code=2)
    assert "programs.d" in failed.stderr
    assert any(e.get("event") == "reload_failed" for e in log_events(supervisor))


def test_check_warns_about_what_this_host_lacks_and_strict_fails(sv_dirs: SupervisorDirs) -> None:
    sv_dirs.write_config(
        '[programs.ghost]\ncommand = ["/nonexistent/daemon"]\ndirectory = "/nonexistent"\n'
        'user = "no-such-user-x"\nrestore = "0123456789abcdef0123456789abcdef"\n\n'
        '[programs.unpathed]\ncommand = "no-such-command-x --flag"\n',
        extra_supervisor='include = ["conf.d/*.toml"]',
    )
    config = str(sv_dirs.config)
    done = run_cli("check", "-c", config)
    assert done.returncode == 0, done
    warnings = done.stderr.splitlines()
    expected = [
        'supervisor.include[0]: "conf.d/*.toml" matches no file',
        'programs.ghost.command: "/nonexistent/daemon" is not an executable file',
        'programs.ghost.directory: "/nonexistent" is not a directory',
        'programs.ghost.user: no user "no-such-user-x"',
        "programs.ghost.restore: program 'ghost' has no images",
        'programs.unpathed.command: "no-such-command-x" is not found in PATH',
    ]
    if "CAP_SYS_RESOURCE" not in host_capabilities():
        expected.append("programs.ghost.user: 'no-such-user-x' cannot be checkpointed here")
    for fragment in expected:
        assert any(fragment in w and config in w for w in warnings), (fragment, warnings)
    assert len(warnings) == len(expected)
    strict = run_cli("check", "--strict", "-c", config)
    assert strict.returncode == 2
    assert f"{len(expected)} warnings, and --strict" in strict.stderr


# CRIU cannot dump an io_uring instance (syscall 425, io_uring_setup, on x86-64 and arm64).
WITH_IO_URING = json.dumps(
    [
        sys.executable,
        "-c",
        "import ctypes, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.syscall(425, 4, ctypes.create_string_buffer(120)) >= 0\n"
        "signal.pause()\n",
    ]
)


@pytest.mark.criu
@pytest.mark.usefixtures("needs_criu")
def test_status_shows_a_failed_checkpoint_with_its_cause(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(
        f"[programs.uring]\ncommand = {WITH_IO_URING}\nstartsecs = 0\n"
        "[programs.uring.checkpoint]\non_signal = true\n\n"
        f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n"
    )
    supervisor.start()
    pid = supervisor.wait_running("uring", "idle")["uring"]
    assert supervisor.status()["uring"]["last_checkpoint_failure"] is None

    failed = supervisor.cli("checkpoint", "uring", code=1)
    assert "criu dump failed" in failed.stderr, failed.stderr
    entry = supervisor.status()["uring"]
    failure = entry["last_checkpoint_failure"]
    assert isinstance(failure, dict)
    assert failure["trigger"] == "manual"
    cause = r"criu dump failed: pid \d+ \(python\S*\) holds fd 3, an io_uring instance; "
    assert re.match(cause, failure["error"]), failure
    assert "to fix: the program uses io_uring" in failure["error"], failure
    # The program runs on, the same instance, and status still exits 0 (nothing is FATAL).
    assert (entry["state"], entry["pid"]) == ("RUNNING", pid)
    line = supervisor.cli("status", "uring").stdout
    assert line.startswith("uring ")
    assert "RUNNING" in line
    assert f"last checkpoint FAILED at {failure['at'][:10]} " in line, line
    assert f"(manual): {failure['error']}" in line, line
    assert "last checkpoint FAILED" not in supervisor.cli("status", "idle").stdout

    # A failure of the SIGUSR1 round replaces it, with its own trigger.
    os.kill(supervisor.pid, signal.SIGUSR1)
    wait_until(
        lambda: supervisor.status()["uring"]["last_checkpoint_failure"] != failure,
        60.0,
        "the SIGUSR1 round's failure",
    )
    again = supervisor.status()["uring"]["last_checkpoint_failure"]
    assert isinstance(again, dict)
    assert again["trigger"] == "signal"
    assert again["at"] > failure["at"], (again, failure)
    assert "(signal): criu dump failed: pid " in supervisor.cli("status").stdout
