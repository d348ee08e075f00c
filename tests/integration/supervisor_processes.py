"""Supervisors a test runs as processes (`grenadine-sv -c CONFIG`), kills with SIGKILL and
replaces; asked through the command line. Everything they start or leave is ended by pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tests.integration.supervising import children_of, pid_alive
from tests.leftovers import KEEPER_NAME, end_leftovers

GRENADINE_SV = [sys.executable, "-m", "grenadine_sv"]
STOP_TIMEOUT = 60.0


def status(config: Path) -> list[dict[str, Any]]:
    """`grenadine-sv status --json`; empty while no supervisor answers."""
    result = subprocess.run(
        [*GRENADINE_SV, "-c", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(result.stdout) if result.returncode == 0 else []


def running_pid(config: Path, name: str) -> int | None:
    """The pid of `name` while it is RUNNING."""
    for entry in status(config):
        if entry["name"] == name and entry["state"] == "RUNNING":
            return int(entry["pid"])
    return None


class Processes:
    """Every process a test starts or leaves behind, ended by pid when it finishes: the
    supervisors it started (SIGTERM, bounded, then SIGKILL), the program instances and
    CRIU processes it noted in `pids`, and what supervisors killed for good left on the
    state_dirs in `state_dirs` (tests.leftovers)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()
        self.state_dirs: set[Path] = set()

    def supervisor(self, config: Path, state_dir: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a supervisor on `config`, its stderr appended to supervisors.log beside it."""
        with (config.parent / "supervisors.log").open("ab") as log:
            process = subprocess.Popen([*GRENADINE_SV, "-c", str(config)], stderr=log)
        self.started.append(process)
        if state_dir is not None:
            self.state_dirs.add(state_dir)
        return process

    def end_all(self, also: Callable[[], Iterable[int]] = tuple) -> None:
        """End everything; `also` names more processes once the supervisors have stopped."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self.pids | set(also()):
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Re-parented to this test process when it is a child subreaper: reap it.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for state_dir in self.state_dirs:
            end_leftovers(state_dir)
        reap_orphaned_keepers()


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a supervisor, by its pid, and reap it."""
    process.kill()
    process.wait()


def reap_orphaned_keepers() -> None:
    """A killed supervisor's stdio keeper is re-parented to this process when it is a child
    subreaper; the next supervisor ends it, and it is reaped here."""
    for child in children_of(os.getpid()):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{child}/stat").read_text()
            if f"({KEEPER_NAME}) Z" in stat:
                os.waitpid(child, 0)
