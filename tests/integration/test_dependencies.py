"""on_dependency_stop: what happens to a program when a program it depends on stops or
crashes ("restart": stopped, started again once the dependency runs; "stop": stopped;
"ignore": left running), shown by status."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import SupervisorDirs
from tests.integration.supervising import wait_until
from tests.integration.test_cli import IDLE, SupervisorProcess, is_alive, supervisor
from tests.integration.test_cli_contract import log_events

__all__ = ["supervisor"]

pytestmark = pytest.mark.root

TIMEOUT = 20.0


def program(name: str, policy: str | None = None) -> str:
    table = f"[programs.{name}]\ncommand = {IDLE}\nstartsecs = 0\n"
    if policy is not None:
        table += f'depends_on = ["db"]\non_dependency_stop = "{policy}"\n'
    return table + "\n"


def states(supervisor: SupervisorProcess) -> dict[str, str]:
    return {name: str(entry["state"]) for name, entry in supervisor.status().items()}


def test_dependents_follow_their_dependency_as_each_says(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(
        program("db")
        + program("web", "restart")
        + program("worker", "stop")
        + program("side", "ignore")
    )
    supervisor.start()
    pids = supervisor.wait_running("db", "web", "worker", "side")
    line = supervisor.cli("status", "web").stdout
    assert "depends on db (on_dependency_stop restart)" in line, line

    supervisor.cli("stop", "db")
    wait_until(
        lambda: (
            states(supervisor)
            == {"db": "STOPPED", "web": "STOPPED", "worker": "STOPPED", "side": "RUNNING"}
        ),
        TIMEOUT,
        "web and worker stopped with db, side left running",
    )
    assert "stopped because db stopped" in supervisor.cli("status", "worker").stdout
    assert supervisor.status()["side"]["pid"] == pids["side"]
    followed = [e for e in log_events(supervisor) if e.get("event") == "dependency_stopped"]
    assert sorted((e["program"], e["on_dependency_stop"]) for e in followed) == [
        ("web", "restart"),
        ("worker", "stop"),
    ]

    supervisor.cli("start", "db")
    again = supervisor.wait_running("db", "web")
    assert again["web"] != pids["web"]
    assert states(supervisor)["worker"] == "STOPPED"

    # A crash of the dependency (its automatic restart) does the same.
    os.kill(again["db"], signal.SIGKILL)
    wait_until(
        lambda: (
            (s := supervisor.status())["db"]["restarts"] == 1
            and s["web"]["state"] == "RUNNING"
            and s["web"]["pid"] != again["web"]
        ),
        TIMEOUT,
        "web stopped and started again around db's restart",
    )
    assert not is_alive(again["web"])
    assert supervisor.status()["side"]["pid"] == pids["side"]


def test_an_operators_stop_of_a_dependent_is_not_undone(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    sv_dirs.write_config(program("db") + program("web", "restart"))
    supervisor.start()
    supervisor.wait_running("db", "web")
    supervisor.cli("stop", "db")
    wait_until(lambda: states(supervisor)["web"] == "STOPPED", TIMEOUT, "web stopped")
    supervisor.cli("stop", "web")  # the operator wants it down
    supervisor.cli("start", "db")
    supervisor.wait_running("db")
    # The restart would have been decided when db became RUNNING, and logged then.
    events = [e.get("event") for e in log_events(supervisor) if e.get("program") == "web"]
    assert "dependency_running_again" not in events
    assert states(supervisor)["web"] == "STOPPED"


def test_a_dependent_waiting_for_its_dependency_starts_once_a_reload_replaced_it(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    """web waits for db, whose definition a reload changes before db is ready: db's runner
    is replaced, and web starts once the new db runs."""
    never_ready_db = f"[programs.db]\ncommand = {IDLE}\nstartsecs = 3600\n\n"
    sv_dirs.write_config(never_ready_db + program("web", "restart"))
    supervisor.start()
    wait_until(
        lambda: any(
            (e.get("event"), e.get("program")) == ("waiting_for_dependency", "web")
            for e in log_events(supervisor)
        ),
        TIMEOUT,
        "web waits for db",
    )
    first_db = supervisor.status()["db"]
    assert (first_db["state"], states(supervisor)["web"]) == ("STARTING", "STOPPED")

    changed_db = f'[programs.db]\ncommand = {IDLE}\nstartsecs = 0\nenvironment = {{ V = "2" }}\n\n'
    sv_dirs.write_config(changed_db + program("web", "restart"))
    assert json.loads(supervisor.cli("reload", "--json").stdout)["changed"] == ["db"]
    pids = supervisor.wait_running("db", "web")
    assert pids["db"] != first_db["pid"]
    assert not is_alive(int(str(first_db["pid"])))
