"""Shared fixtures: short-pathed temporary supervisor directories and configuration files; and
the check that the tests leave no process or cgroup of their own behind (tests/leftovers.py)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grenadine_sv.criu.binary import CriuNotFound, find_criu
from tests.leftovers import (
    END_WAIT_SECONDS,
    SESSION_VARIABLE,
    end_leftovers,
    end_pids,
    session_processes,
    settled_leftovers,
)

# Every state_dir the tests gave a supervisor, for the check at the end of the session.
STATE_DIRS: set[Path] = set()


@dataclass(frozen=True)
class SupervisorDirs:
    root: Path

    def __post_init__(self) -> None:
        STATE_DIRS.add(self.state_dir)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def socket(self) -> Path:
        return self.root / "ctl.sock"

    @property
    def config(self) -> Path:
        return self.root / "grenadine.toml"

    def write_config(
        self, programs: str, *, extra_supervisor: str = "", metrics_listen: str = ""
    ) -> Path:
        """Write a configuration with these [programs.*] tables and return its path."""
        self.config.write_text(
            f"""
[supervisor]
state_dir = "{self.state_dir}"
log_dir = "{self.log_dir}"
control_socket = "{self.socket}"
log_format = "json"
{extra_supervisor}

[supervisor.metrics]
listen = "{metrics_listen}"

{programs}
"""
        )
        return self.config

    def stdout_log(self, program: str) -> Path:
        return self.log_dir / f"{program}.out.log"


@pytest.fixture
def sv_dirs() -> Iterator[SupervisorDirs]:
    # Unix socket paths are limited to 107 bytes: keep the root short, not under tmp_path.
    root = Path(tempfile.mkdtemp(prefix="gsv-", dir="/tmp"))
    try:
        yield SupervisorDirs(root)
        check_nothing_left(root / "state")
    finally:
        end_leftovers(root / "state")
        shutil.rmtree(root, ignore_errors=True)


def check_nothing_left(state_dir: Path) -> None:
    """Fail the test whose supervisors left a keeper, a program or a cgroup behind: a test
    that kills a supervisor for good ends what it left with tests.leftovers.end_leftovers."""
    found = settled_leftovers(state_dir)
    if found:
        end_leftovers(state_dir)
        pytest.fail(f"the test left behind (now ended): {found.describe()}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces and mounts")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, saying why, tests whose markers ask for what this machine lacks."""
    if item.get_closest_marker("root") is not None:
        require_root()
    if item.get_closest_marker("criu") is not None:
        try:
            find_criu()
        except CriuNotFound as exc:
            pytest.skip(str(exc))


def pytest_configure(config: pytest.Config) -> None:
    """Mark this session's processes: each process a test starts inherits the variable."""
    os.environ.setdefault(SESSION_VARIABLE, uuid.uuid4().hex)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session, loudly, when its tests left processes or cgroups of their own."""
    reports = []
    for state_dir in sorted(STATE_DIRS):
        found = settled_leftovers(state_dir, bound=0)
        if found:
            end_leftovers(state_dir)
            reports.append(f"{state_dir}: {found.describe()}")
    deadline = time.monotonic() + END_WAIT_SECONDS
    while (pids := session_processes(os.environ[SESSION_VARIABLE])) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pids:
        described = [f"{pid} ({process_summary(pid)})" for pid in pids]
        reports.append(f"processes of this session still running: {', '.join(described)}")
        end_pids(pids)
    if reports:
        terminal = session.config.get_terminal_writer()
        terminal.line()
        terminal.sep("!", "the tests left these behind (now ended by pid)", red=True, bold=True)
        for report in reports:
            terminal.line(report, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def process_summary(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "gone"
