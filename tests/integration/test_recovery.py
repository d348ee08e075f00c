"""A supervisor killed with SIGKILL: the next one takes its programs back, never a second copy."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.conftest import STATE_DIRS, SupervisorDirs, free_port
from tests.integration.supervising import IDLE, counter_command, hit, pid_alive, wait_until
from tests.integration.supervisor_processes import (
    GRENADINE_SV,
    Processes,
    kill,
    running_pid,
    status,
)
from tests.leftovers import cgroup_subtree, end_pids, find_leftovers

pytestmark = [pytest.mark.root, pytest.mark.criu]


def test_killed_supervisor_is_replaced_and_the_program_taken_back(
    sv_dirs: SupervisorDirs, processes: Processes
):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.counter]\ncommand = {counter_command(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    first = processes.supervisor(config)
    wait_until(lambda: running_pid(config, "counter") is not None, what="counter running")
    orphan_pid = running_pid(config, "counter") or 0
    processes.pids.add(orphan_pid)
    assert [hit(port) for _ in range(3)] == [1, 2, 3]
    kill(first)
    assert os.path.exists(f"/proc/{orphan_pid}")

    second = processes.supervisor(config)
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


def test_second_supervisor_on_the_same_control_socket_starts_nothing(sv_dirs: SupervisorDirs):
    """Another state_dir but the same control_socket (a copied configuration): refused before
    it starts a stdio keeper, a launcher or cgroups, so nothing of it outlives it."""
    config = sv_dirs.write_config("")
    other_state_dir = sv_dirs.root / "other-state"
    STATE_DIRS.add(other_state_dir)
    other = sv_dirs.root / "other.toml"
    other.write_text(
        config.read_text().replace(str(sv_dirs.state_dir), str(other_state_dir))
        + f"[programs.idle]\ncommand = {IDLE}\n"
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
        assert f"another supervisor is listening on {sv_dirs.socket}" in second.stderr
        assert not find_leftovers(other_state_dir), find_leftovers(other_state_dir).describe()
        assert not (other_state_dir / "stdio-keeper.sock").exists()
        answer = subprocess.run(
            [*GRENADINE_SV, "-c", str(config), "pid"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert answer.stdout.strip() == str(first.pid), "the first supervisor answers as before"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def test_next_supervisor_removes_the_cgroup_of_a_program_that_died_meanwhile(
    sv_dirs: SupervisorDirs, processes: Processes
):
    config = sv_dirs.write_config(f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n")
    subtree = cgroup_subtree(sv_dirs.state_dir)
    assert subtree is not None
    program_cgroup = subtree / "program-idle"
    first = processes.supervisor(config, sv_dirs.state_dir)
    wait_until(lambda: running_pid(config, "idle") is not None, what="idle running")
    kill(first)
    # The program dies while no supervisor runs: its cgroup is left empty.
    end_pids(find_leftovers(sv_dirs.state_dir).programs)
    assert program_cgroup.is_dir()

    config.write_text(config.read_text().replace("startsecs = 0", "autostart = false"))
    second = processes.supervisor(config)
    wait_until(lambda: bool(status(config)), what="the next supervisor lists its programs")
    assert not program_cgroup.exists()
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
