"""A real supervisord (PyPI `supervisor`) run for a benchmark: the same programs as grenadine-sv
gets, its XML-RPC interface on a loopback port, and its end (by pid, programs included)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.bench.grenadine import ProgramSpec
from tests.bench.procs import BenchError, ProcessRef, end_child, end_leftovers, wait_until
from tests.bench.programs import free_port

_SCRIPT = Path(sys.executable).with_name("supervisord")
SUPERVISORD: tuple[str, ...] = (
    (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "supervisor.supervisord")
)
START_TIMEOUT = 30.0
STOP_GRACE = 120.0


class Supervisord:
    """`supervisord -n -c CONFIG` in the foreground, everything it writes under `root`."""

    def __init__(self, root: Path, programs: Sequence[ProgramSpec]) -> None:
        self.root = root
        self.programs = tuple(programs)
        self.config = root / "supervisord.conf"
        self.log_dir = root / "logs"
        self.log_path = root / "supervisord.log"
        self.port = free_port()
        self.launched_at = 0.0
        self.launched_wall = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self.rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.port}/RPC2")

    def config_text(self) -> str:
        parts = [
            "[supervisord]",
            "nodaemon = true",
            "user = root",
            f"logfile = {self.log_path}",
            f"pidfile = {self.root / 'supervisord.pid'}",
            f"childlogdir = {self.log_dir}",
            "[inet_http_server]",
            f"port = 127.0.0.1:{self.port}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        ]
        for program in self.programs:
            parts += [f"[program:{program.name}]", f"command = {shlex.join(program.command)}"]
            parts += [f"{key} = {value}" for key, value in self.program_settings(program).items()]
        return "\n".join(parts) + "\n"

    def program_settings(self, program: ProgramSpec) -> dict[str, Any]:
        """The keys grenadine-sv and supervisord share, with grenadine-sv's defaults."""
        settings: dict[str, Any] = {
            "autostart": "true",
            "autorestart": "unexpected",
            "startsecs": 1,
            "startretries": 3,
            "stopsignal": "TERM",
            "stopwaitsecs": 10,
            "stdout_logfile": self.log_dir / f"{program.name}.out.log",
            "stderr_logfile": self.log_dir / f"{program.name}.err.log",
        }
        for key in ("startsecs", "startretries", "stopsignal", "stopwaitsecs"):
            if key in program.settings:
                settings[key] = program.settings[key]
        return settings

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError("supervisord is not running")
        return self._process.pid

    def __enter__(self) -> Self:
        self.log_dir.mkdir()
        self.config.write_text(self.config_text())
        self.launched_at, self.launched_wall = time.monotonic(), time.time()
        self._process = subprocess.Popen(
            [*SUPERVISORD, "-n", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until(self._answers, START_TIMEOUT, f"supervisord to listen on {self.port}")
        except BaseException:
            self._end()
            raise
        return self

    def check_alive(self) -> None:
        """Raise BenchError, with its exit code and last log lines, if supervisord ended."""
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            try:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            except FileNotFoundError:
                tail = "(no log)"
            raise BenchError(f"supervisord ended (exit code {code}); log:\n{tail}")

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise BenchError(
                f"supervisord exited with {self._process.returncode}; see {self.log_path}"
            )
        try:
            self.rpc.supervisor.getState()
        except OSError:
            return False
        return True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    def _end(self) -> None:
        if self._process is None:
            return
        programs: list[ProcessRef] = []
        if self._process.poll() is None:
            try:
                programs = self.program_refs()
            except (xmlrpc.client.Error, OSError):
                programs = []  # it is stopped by pid all the same
        end_child(self._process, STOP_GRACE)
        end_leftovers(programs)
        self._process = None

    def status(self) -> list[dict[str, Any]]:
        """One entry per program: name, state (supervisord's state name), pid (0 if none)."""
        infos = self.rpc.supervisor.getAllProcessInfo()
        assert isinstance(infos, list)
        return [{"name": i["name"], "state": i["statename"], "pid": i["pid"]} for i in infos]

    def all_in_state(self, state: str) -> bool:
        entries = self.status()
        return len(entries) == len(self.programs) and all(e["state"] == state for e in entries)

    def program_refs(self) -> list[ProcessRef]:
        refs = []
        for entry in self.status():
            if entry["pid"]:
                try:
                    refs.append(ProcessRef.of(int(entry["pid"])))
                except FileNotFoundError:
                    continue
        return refs

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def startup_marks(self) -> tuple[float, float]:
        """Wall-clock times (from its log) at which supervisord was initialised and at which
        the last program became RUNNING."""
        started: float | None = None
        running: list[float] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "supervisord started with pid" in line:
                started = _log_time(line)
            elif "entered RUNNING state" in line:
                running.append(_log_time(line))
        if started is None or not running:
            raise BenchError(f"no start or RUNNING line in {self.log_path}")
        return started, max(running)


def _log_time(line: str) -> float:
    """The local time that starts a supervisord log line: "2026-01-31 12:00:00,123 INFO ..."."""
    stamp = " ".join(line.split()[:2])
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
