"""The shipped systemd unit, run by a real systemd (PID 1 of a systemd-nspawn container).

What the unit's `KillMode=process`, `Delegate=yes` and `Restart=on-failure` must give: a crash of
the supervisor leaves its sandboxes and stdio keeper running, systemd starts a new supervisor in
the same unit, and that one takes the programs back with their memory; `systemctl restart` with
`checkpoint.on_stop` brings a program back as it was; `systemctl stop` leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.supervising import COUNTER_SERVICE, counter_reply, hit, wait_until
from tests.integration.systemd_container import (
    REPO_ROOT,
    UNIT_NAME,
    SystemdContainer,
    nspawn_available,
    systemd_container,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

SUPERVISOR = Path(sys.prefix) / "bin" / "grenadine-sv"


def counter_started(port: int) -> float:
    """The start time the counter reports: it changes only when the process is a new one."""
    return counter_reply(port)["started"]


def answers(port: int) -> bool:
    try:
        hit(port)
    except OSError:
        return False
    return True


@pytest.fixture
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SystemdContainer, int]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-nspawn")
    if not nspawn_available():
        pytest.skip("needs systemd-nspawn (systemd-container; contrib/bootstrap installs it)")
    config_dir = Path(tmp_path_factory.mktemp("systemd", numbered=True))
    port = free_port()
    # The sandbox's root is a bind of the container's / alone: the checkout and /usr are
    # mounts of their own in the container, so the program binds them.
    (config_dir / "grenadine.toml").write_text(
        f"""
[supervisor]
state_dir = "/var/lib/grenadine-sv"
control_socket = "/run/grenadine-sv.sock"
log_dir = "/var/log/grenadine-sv"

[supervisor.metrics]
listen = ""

[programs.counter]
command = ["python3", "{COUNTER_SERVICE.name}", "--port", "{port}"]
directory = "{COUNTER_SERVICE.parent}"
binds = ["{REPO_ROOT}", "/usr"]
ready = {{ tcp = "127.0.0.1:{port}", timeout = "20s" }}
restore = "latest"

[programs.counter.checkpoint]
on_stop = true
"""
    )
    drop_in = f"[Service]\nExecStart=\nExecStart={SUPERVISOR} -c /etc/grenadine-sv/grenadine.toml\n"
    with systemd_container(f"gsv{os.getpid()}", config_dir, drop_in) as booted:
        yield booted, port


def test_the_unit_keeps_programs_through_a_crash_a_restart_and_cleans_up_on_stop(
    container: tuple[SystemdContainer, int],
) -> None:
    machine, port = container
    machine.run(["systemctl", "start", UNIT_NAME])
    wait_until(lambda: answers(port), 60, "the counter answers under systemd")
    hit(port)
    started = counter_started(port)
    count = hit(port)

    # A crash: systemd restarts the supervisor; the sandbox it left is taken back, memory and all.
    crashed = machine.main_pid()
    machine.run(["kill", "-s", "KILL", str(crashed)])
    wait_until(
        lambda: machine.main_pid() not in (0, crashed), 60, "systemd restarts the supervisor"
    )
    wait_until(lambda: "orphan_" in machine.journal(), 60, "the new supervisor finds the sandbox")
    wait_until(lambda: answers(port), 60, "the counter answers after the crash")
    journal = machine.journal()
    assert "orphan_not_recovered" not in journal, journal[-3000:]
    assert counter_started(port) == started
    assert hit(port) > count + 1

    # `systemctl restart`: on_stop checkpoints the counter, the next supervisor restores it.
    count = hit(port)
    machine.run(["systemctl", "restart", UNIT_NAME])
    wait_until(lambda: answers(port), 60, "the counter answers after systemctl restart")
    journal = machine.journal()
    assert '"trigger": "shutdown"' in journal, journal[-3000:]
    assert counter_started(port) == started
    assert hit(port) > count + 1, journal[-3000:]

    # `systemctl stop`: the supervisor stops its programs itself and leaves the unit empty.
    machine.run(["systemctl", "stop", UNIT_NAME])
    state = machine.run(["systemctl", "show", "--property=ActiveState", "--value", UNIT_NAME])
    assert state.stdout.strip() == "inactive"
    assert not answers(port)
    # The unit's cgroup, with the sandboxes' cgroups below it, is gone: systemd could trim it,
    # which it cannot while any process is left in it.
    for hierarchy in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        unit_cgroup = f"{hierarchy}/system.slice/{UNIT_NAME}"
        assert machine.run(["test", "-e", unit_cgroup], check=False).returncode != 0, unit_cgroup
