"""Shared fixtures: short-pathed temporary supervisor directories and configuration files."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from grenadine_sv.criu.binary import CriuNotFound, find_criu


@dataclass(frozen=True)
class SupervisorDirs:
    root: Path

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
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
