"""A supervisor SIGKILLed at the worst moments: nothing lost, never a second copy (issue 11, items
1 and 2). Each test kills a supervisor it started, by its pid, and starts another one."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grenadine_sv.criu.binary import find_criu
from grenadine_sv.lifecycle.machine import State
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    IDLE,
    children_of,
    hit,
    pid_alive,
    python_program,
    running_supervisor,
    wait_for,
    wait_state,
    wait_until,
)
from tests.integration.supervisor_processes import (
    GRENADINE_SV,
    Processes,
    kill,
    running_pid,
    status,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


def counter_program(
    port: int, *, tick_seconds: float = 0.0, ballast_mib: int = 0, progress: Path | None = None
) -> str:
    """An HTTP hit counter (state in memory only) on `port`; it prints `tick N` every
    `tick_seconds` (never when 0), writing N to `progress` once the print succeeded, and holds
    `ballast_mib` MiB of touched memory."""
    return python_program(
        f"# instance-of-{port}\n"
        "import http.server, json, signal, sys, threading, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"ballast = bytearray({ballast_mib} << 20)\n"
        "for page in range(len(ballast) >> 12): ballast[page << 12] = 1\n"
        "hits = [0]\n"
        "class Handler(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        hits[0] += 1\n"
        "        body = json.dumps({'hits': hits[0]}).encode()\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
        "    def log_message(self, *args): pass\n"
        f"server = http.server.HTTPServer(('127.0.0.1', {port}), Handler)\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "print('serving', flush=True)\n"
        "n = 0\n"
        "while True:\n"
        f"    if {tick_seconds}:\n"
        "        print('tick', n, flush=True)\n"
        f"        if {str(progress)!r} != 'None': open({str(progress)!r}, 'w').write(str(n))\n"
        "        n += 1\n"
        f"    time.sleep({tick_seconds} or 3600)\n"
    )


def instances_of(port: int) -> list[int]:
    """The instances running `counter_program(port)`, found from /proc alone: the host pid
    of PID 1 (the program, or the init that runs it) of each PID namespace it runs in."""
    marker = f"# instance-of-{port}\n".encode()
    roots: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes() and pid_alive(int(entry.name)):
                namespace = os.stat(entry / "ns" / "pid").st_ino
                roots.setdefault(namespace, namespace_root(int(entry.name)))
    return sorted(roots.values())


def namespace_root(pid: int) -> int:
    """The host pid of PID 1 of `pid`'s PID namespace (its ancestor whose NSpid ends in 1)."""
    while True:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["NSpid"].split()[-1] == "1":
            return pid
        pid = int(fields["PPid"])


def program_status(config: Path, name: str) -> dict:
    return next((entry for entry in status(config) if entry["name"] == name), {})


def last_printed(progress: Path) -> int:
    """The last tick the program printed without an error."""
    try:
        return int(progress.read_text() or -1)
    except FileNotFoundError:
        return -1


def ticks(log: Path) -> list[int]:
    try:
        return [int(n) for n in re.findall(rb"^tick (\d+)$", log.read_bytes(), re.MULTILINE)]
    except FileNotFoundError:
        return []


def runs_criu(pid: int) -> bool:
    """`pid` is alive and still CRIU's binary: a task CRIU forks to restore runs CRIU's binary
    too until it becomes the restored program (the root is the supervisor's child, beside
    CRIU: rst_sibling)."""
    with contextlib.suppress(OSError):
        return pid_alive(pid) and os.readlink(f"/proc/{pid}/exe") == os.fspath(
            find_criu().resolve()
        )
    return False


def criu_children(pid: int) -> list[int]:
    return [child for child in children_of(pid) if runs_criu(child)]


@contextlib.contextmanager
def supervisors(port: int) -> Iterator[Processes]:
    """Supervisors the test starts; on leaving, every one of them and every instance of the
    program is ended by its pid."""
    processes = Processes()
    try:
        yield processes
    finally:
        processes.end_all(also=lambda: instances_of(port))


def test_a_printing_program_outlives_a_killed_supervisor_and_its_output_is_kept(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    progress = sv_dirs.root / "progress"
    command = counter_program(port, tick_seconds=0.2, progress=progress)
    config = sv_dirs.write_config(
        f'[programs.ticker]\ncommand = {command}\nready = {{ tcp = "127.0.0.1:{port}" }}\n'
        # It writes `progress` in the test's directory, below the host's /tmp.
        f'binds = ["{sv_dirs.root}"]\n'
    )
    log = sv_dirs.stdout_log("ticker")
    with supervisors(port) as processes:
        first = processes.supervisor(config)
        wait_until(lambda: running_pid(config, "ticker") is not None, 30, "ticker running")
        orphan = running_pid(config, "ticker") or 0
        assert [hit(port) for _ in range(3)] == [1, 2, 3]
        wait_until(lambda: len(ticks(log)) >= 3, what="ticks in the log")
        kill(first)

        # With no supervisor at all, the program goes on printing (10 more lines, 2 s).
        before = last_printed(progress)
        wait_until(
            lambda: not pid_alive(orphan) or last_printed(progress) >= before + 10,
            30,
            "ten more lines printed, or the program gone",
        )
        assert pid_alive(orphan), "the program died with its supervisor"
        printed_while_alone = last_printed(progress)

        processes.supervisor(config)
        wait_until(lambda: running_pid(config, "ticker") not in (None, orphan), 60, "taken back")
        assert hit(port) == 4  # its memory was kept
        wait_until(lambda: ticks(log)[-1] >= printed_while_alone + 15, 30, "ticks go on")
        printed = ticks(log)
        # Every line, those printed while no supervisor existed too, once and in order.
        assert printed == list(range(len(printed)))
        assert instances_of(port) == [running_pid(config, "ticker")]


def test_supervisor_killed_during_a_restore_leaves_one_copy(sv_dirs: SupervisorDirs):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.big]\ncommand = {counter_program(port, ballast_mib=768)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = 60 }}\n'
    )
    restore_logs = sv_dirs.state_dir / "restore-logs" / "big"
    with supervisors(port) as processes:
        first = processes.supervisor(config)
        wait_until(lambda: running_pid(config, "big") is not None, 60, "big running")
        assert [hit(port) for _ in range(3)] == [1, 2, 3]
        checkpoint = subprocess.run(
            [*GRENADINE_SV, "-c", str(config), "checkpoint", "big", "--stop"],
            capture_output=True,
            check=False,
            timeout=120,
        )
        assert checkpoint.returncode == 0, checkpoint.stderr
        assert instances_of(port) == []
        restore = subprocess.Popen(
            [*GRENADINE_SV, "-c", str(config), "restore", "big", "latest"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Kill the supervisor once CRIU has taken the request (its log exists).
            def restoring() -> bool:
                return bool(criu_children(first.pid)) and any(restore_logs.glob("*.log"))

            wait_until(restoring, 60, "criu restoring")
            criu = criu_children(first.pid)
            kill(first)
        finally:
            restore.wait(timeout=60)
        # CRIU carries on without its caller; let it finish before the next supervisor starts.
        # A task CRIU had forked for the restore has become the program by then, or is gone.
        wait_until(lambda: not any(runs_criu(pid) for pid in criu), 120, "criu finished")
        restored = instances_of(port)

        processes.supervisor(config)
        wait_until(lambda: running_pid(config, "big") is not None, 120, "big running again")
        # Exactly one copy, the one the supervisor knows, and the state of the image.
        wait_until(lambda: len(instances_of(port)) == 1, 30, "one copy")
        assert instances_of(port) == [running_pid(config, "big")]
        assert len(restored) == 1, "CRIU finished the restore without its supervisor"
        assert hit(port) == 4, "the restored copy was taken back, memory and all"


def test_unwritable_state_file_then_kill_leaves_one_copy_and_no_restart_storm(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.counter]\ncommand = {counter_program(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    # The state file is replaced through a temporary file: a directory in its place makes
    # every write fail (state_file_write_failed), as a full state_dir would.
    sv_dirs.state_dir.mkdir(mode=0o700)
    (sv_dirs.state_dir / ".supervisor.json.tmp").mkdir()
    with supervisors(port) as processes:
        first = processes.supervisor(config)
        wait_until(lambda: running_pid(config, "counter") is not None, 30, "counter running")
        orphan = running_pid(config, "counter")
        assert [hit(port) for _ in range(3)] == [1, 2, 3]
        assert not (sv_dirs.state_dir / "supervisor.json").exists()
        kill(first)
        assert pid_alive(orphan or 0)

        processes.supervisor(config)
        wait_until(lambda: running_pid(config, "counter") not in (None, orphan), 60, "taken back")
        assert hit(port) == 4  # the orphan itself was taken back, memory and all
        assert instances_of(port) == [running_pid(config, "counter")]
        settle = time.monotonic() + 3
        while time.monotonic() < settle:  # a restart storm would show within this
            entry = program_status(config, "counter")
            assert entry["state"] == "RUNNING", entry
            assert entry["restarts"] == 0, entry
            time.sleep(0.2)


async def test_a_port_held_by_another_process_does_not_make_the_program_ready(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    # The program never listens; the port is held by this test, which accepts connections.
    config = sv_dirs.write_config(
        f"[programs.impostor]\ncommand = {IDLE}\nstartretries = 1\n"
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = 1, interval = 0.1 }}\n'
    )
    with socket.create_server(("127.0.0.1", port)):
        async with running_supervisor(config) as sv:
            await wait_state(sv, "impostor", State.FATAL, 30)
            machine = sv.programs.runners["impostor"].machine
            assert "answered by a process that is not this instance" in machine.reason
            assert State.RUNNING not in [state for _, state in machine.history]


async def test_a_copy_that_turns_up_in_a_running_programs_cgroup_is_ended(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "idle", State.RUNNING)
        cgroup = sv.programs.runners["idle"].cgroup
        assert cgroup is not None
        instance = set(cgroup.pids())  # the program (and tini, its PID 1)
        assert pid in instance
        # A second sandbox in the program's cgroup, as a restore left running by a killed
        # supervisor would put there: PID 1 of its own PID namespace.
        procs = os.fspath(cgroup.path / "cgroup.procs")
        intruder = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {procs} && exec unshare --pid --fork sleep 600"]
        )
        try:
            await wait_for(
                lambda: set(cgroup.pids()) > instance or intruder.poll() is not None,
                what="the intruder in the cgroup",
            )
            # (Reaped as it is polled: a zombie child of this test may stay listed meanwhile.)
            await wait_for(
                lambda: intruder.poll() is not None and set(cgroup.pids()) == instance,
                timeout=10,
                what="the intruder ended, the instance alone",
            )
            assert intruder.returncode == -signal.SIGKILL
            assert sv.programs.runners["idle"].state == State.RUNNING
            assert sv.programs.runners["idle"].machine.pid == pid
        finally:
            intruder.kill()
            intruder.wait()
