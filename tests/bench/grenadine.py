"""A real grenadine-sv supervisor run for a benchmark: its configuration, its process, its
control socket and command line, and its end (by pid, programs included)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from grenadine_sv.control import client as control
from grenadine_sv.control import protocol
from tests.bench.procs import (
    BenchError,
    ProcessRef,
    end_child,
    end_leftovers,
    run_checked,
    wait_until,
)
from tests.bench.profiling import PySpy
from tests.bench.settings import ProfileTarget

# The installed command, as a user runs it; `python -m grenadine_sv` where it is not installed.
_SCRIPT = Path(sys.executable).with_name("grenadine-sv")
GRENADINE_SV: tuple[str, ...] = (
    (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "grenadine_sv")
)
START_TIMEOUT = 30.0
STOP_GRACE = 120.0
REQUEST_TIMEOUT = 600.0
STATUS_TIMEOUT = 30.0


def toml_value(value: Any) -> str:
    """A TOML literal for a string, number, boolean, list or inline table (JSON's string and
    array syntax is valid TOML)."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool | int | float | str):
        return json.dumps(value)
    raise TypeError(f"no TOML literal for {value!r}")


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    command: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    """More keys of [programs.NAME]."""
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    """Keys of [programs.NAME.checkpoint]."""

    def toml(self) -> str:
        lines = [f"[programs.{self.name}]", f"command = {toml_value(self.command)}"]
        lines += [f"{key} = {toml_value(value)}" for key, value in self.settings.items()]
        if self.checkpoint:
            lines.append(f"[programs.{self.name}.checkpoint]")
            lines += [f"{key} = {toml_value(value)}" for key, value in self.checkpoint.items()]
        return "\n".join(lines) + "\n"


class GrenadineSupervisor:
    """`grenadine-sv -c CONFIG` in the foreground, with its state, logs and socket under `root`."""

    def __init__(
        self,
        root: Path,
        programs: Sequence[ProgramSpec],
        profile: ProfileTarget | None = None,
    ) -> None:
        self.root = root
        self.profile = profile
        self._py_spy: PySpy | None = None
        self.programs = tuple(programs)
        self.state_dir = root / "state"
        self.log_dir = root / "logs"
        self.socket = root / "ctl.sock"
        self.config = root / "grenadine.toml"
        self.log_path = root / "supervisor.log"
        self.launched_at = 0.0
        self.launched_wall = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        head = (
            "[supervisor]\n"
            f"state_dir = {toml_value(str(self.state_dir))}\n"
            f"log_dir = {toml_value(str(self.log_dir))}\n"
            f"control_socket = {toml_value(str(self.socket))}\n"
            'log_format = "json"\n'
            "[supervisor.metrics]\n"
            'listen = ""\n'
        )
        return head + "".join(program.toml() for program in self.programs)

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError("the supervisor is not running")
        return self._process.pid

    def __enter__(self) -> Self:
        self.config.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            self.launched_at, self.launched_wall = time.monotonic(), time.time()
            self._process = subprocess.Popen(
                [*GRENADINE_SV, "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            wait_until(self._answers, START_TIMEOUT, f"grenadine-sv to listen on {self.socket}")
        except BaseException:
            self._end()
            raise
        if self.profile is not None:
            self._py_spy = PySpy(self.profile.py_spy, self.pid, self.profile.output)
        return self

    def check_alive(self) -> None:
        """Raise BenchError, with its exit code and last log lines, if the supervisor ended."""
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise BenchError(f"grenadine-sv ended (exit code {code}); log:\n{self.log_tail()}")

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise BenchError(
                f"grenadine-sv exited with {self._process.returncode}: {self.log_tail()}"
            )
        return control.answering_pid(self.socket) == self._process.pid

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    def _end(self) -> None:
        if self._py_spy is not None:
            self._py_spy.stop()
            self._py_spy = None
        if self._process is None:
            return
        programs: list[ProcessRef] = []
        if self._process.poll() is None:
            try:
                programs = self.program_refs()
            except (BenchError, OSError):
                programs = []  # it is stopped by pid all the same; its programs end with it
        end_child(self._process, STOP_GRACE)
        end_leftovers(programs)
        self._process = None

    # talking to it -----------------------------------------------------------

    def request(self, command: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        try:
            return control.request(self.socket, command, args, timeout)
        except (protocol.ControlError, protocol.SupervisorNotRunning) as exc:
            raise BenchError(f"grenadine-sv {command}: {exc}; log: {self.log_tail()}") from exc

    def status(self) -> list[dict[str, Any]]:
        result = self.request("status", timeout=STATUS_TIMEOUT)
        assert isinstance(result, list)
        return result

    def all_in_state(self, state: str, names: Sequence[str] | None = None) -> bool:
        """Whether every program named (default: all) is listed and in `state`."""
        wanted = set(names) if names is not None else {p.name for p in self.programs}
        states = {e["name"]: e["state"] for e in self.status()}
        return all(states.get(name) == state for name in wanted)

    def stop_all(self) -> None:
        """`stop all`, which answers once every program has stopped."""
        self.request("stop", names=["all"])

    def program_refs(self) -> list[ProcessRef]:
        refs = []
        for entry in self.status():
            pid = entry.get("pid")
            if pid:
                try:
                    refs.append(ProcessRef.of(int(pid)))
                except FileNotFoundError:
                    continue
        return refs

    def pid_of(self, name: str) -> int:
        for entry in self.status():
            if entry["name"] == name and entry["pid"]:
                return int(entry["pid"])
        raise BenchError(f"program {name} has no pid: {self.status()}")

    def command(self, *args: str) -> list[str]:
        """The grenadine-sv command line a user types for this supervisor."""
        return [*GRENADINE_SV, "-c", str(self.config), *args]

    def run_cli(self, *args: str) -> str:
        return run_checked(self.command(*args), f"grenadine-sv {' '.join(args)}")

    # what it wrote -------------------------------------------------------------

    def stdout_of(self, program: str) -> str:
        path = self.log_dir / f"{program}.out.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The supervisor's JSON log lines whose event is `event`, oldest first."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
        return found

    def startup_marks(self) -> tuple[float, float]:
        """Wall-clock times (from its log) at which the supervisor was initialised and at which
        the last program became RUNNING."""
        [started] = self.log_events("supervisor_started")
        running = [e for e in self.log_events("program_state") if e.get("to_state") == "RUNNING"]
        if not running:
            raise BenchError(f"no program became RUNNING: {self.log_tail()}")
        return _log_time(started), max(_log_time(e) for e in running)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _log_time(entry: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"])).timestamp()
