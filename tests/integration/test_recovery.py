"""A supervisor killed with SIGKILL: the next one takes its programs back, never a second copy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import counter_command, hit, pid_alive, wait_until

pytestmark = [pytest.mark.root, pytest.mark.criu]

GRENADINE_SV = [sys.executable, "-m", "grenadine_sv"]


def status(config: Path) -> list[dict]:
    result = subprocess.run(
        [*GRENADINE_SV, "-c", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(result.stdout) if result.returncode == 0 else []


def running_pid(config: Path, name: str) -> int | None:
    for entry in status(config):
        if entry["name"] == name and entry["state"] == "RUNNING":
            return int(entry["pid"])
    return None


def test_killed_supervisor_is_replaced_and_the_program_taken_back(sv_dirs: SupervisorDirs):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.counter]\ncommand = {counter_command(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    started: list[subprocess.Popen[bytes]] = []
    orphan_pid = 0
    try:
        first = subprocess.Popen([*GRENADINE_SV, "-c", str(config)], stderr=subprocess.DEVNULL)
        started.append(first)
        wait_until(lambda: running_pid(config, "counter") is not None, what="counter running")
        orphan_pid = running_pid(config, "counter") or 0
        assert [hit(port) for _ in range(3)] == [1, 2, 3]
        first.kill()
        first.wait()
        assert os.path.exists(f"/proc/{orphan_pid}")

        second = subprocess.Popen([*GRENADINE_SV, "-c", str(config)], stderr=subprocess.DEVNULL)
        started.append(second)
        wait_until(lambda: running_pid(config, "counter") not in (None, orphan_pid), 30)
        new_pid = running_pid(config, "counter")
        # The state kept in memory survived: the program was taken back, not started anew.
        assert hit(port) == 4
        # Exactly one copy runs: the orphan is gone.
        wait_until(lambda: not pid_alive(orphan_pid), what="orphan gone")
        assert new_pid is not None
        assert os.path.exists(f"/proc/{new_pid}")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        assert not pid_alive(new_pid)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        if orphan_pid and pid_alive(orphan_pid):
            os.kill(orphan_pid, signal.SIGKILL)
        if orphan_pid:
            # When this test process is a child subreaper (other tests make it one), the
            # orphan was re-parented to it: reap it.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(orphan_pid, 0)


def test_second_supervisor_on_the_same_state_dir_is_refused(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config("")
    other = sv_dirs.root / "other.toml"
    other.write_text(
        config.read_text().replace(str(sv_dirs.socket), str(sv_dirs.root / "other.sock"))
    )
    first = subprocess.Popen([*GRENADINE_SV, "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_until(sv_dirs.socket.exists, what="first supervisor up")
        second = subprocess.run(
            [*GRENADINE_SV, "-c", str(other)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "another supervisor is using" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
