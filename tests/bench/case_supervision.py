"""Case 3: what supervising costs, grenadine-sv (every program in its own PID and mount
namespaces) against supervisord, configured with the same 50 programs: time from launching the
supervisor until all are RUNNING, time to stop them all, the supervisor's CPU while idle, and
its resident memory."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.bench.grenadine import GrenadineSupervisor, ProgramSpec
from tests.bench.procs import (
    BenchError,
    ProcessRef,
    cpu_seconds,
    descendants_in_own_pid_namespace,
    pss_bytes,
    rss_bytes,
    scratch_dir,
    wait_until,
)
from tests.bench.programs import IDLE_SHELL
from tests.bench.settings import Settings
from tests.bench.stats import Comparison, Target
from tests.bench.supervisord import Supervisord

STATE_TIMEOUT = 300.0
INIT_NAMES = frozenset({"tini", "tini-static"})
# The floor: the libraries the supervisor runs on, as loaded by a bare interpreter (a
# model validated, as the configuration is), with the same structlog setting as `run`. Those a
# supervisor without a metrics endpoint has loaded before its first checkpoint: not
# prometheus_client (metrics are off here) nor pycriu (loaded by the first dump or restore).
REQUIRED_LIBRARIES_PROBE = """
import sys
sys.modules.setdefault("rich", None)
import blake3, pydantic, structlog, tomllib, trio
class Probe(pydantic.BaseModel):
    name: str
Probe(name="probe")
print("ready", flush=True)
sys.stdin.read()
"""
OWN_CODE_ALLOWANCE_BYTES = 5 * 2**20
# Both supervisors are polled alike, and not so often that polling becomes their workload.
STATE_POLL_SECONDS = 0.05


class Supervised(Protocol):
    launched_at: float
    launched_wall: float

    @property
    def pid(self) -> int: ...

    def all_in_state(self, state: str) -> bool: ...

    def program_refs(self) -> list[ProcessRef]: ...

    def stop_all(self) -> None: ...

    def startup_marks(self) -> tuple[float, float]: ...

    def check_alive(self) -> None: ...


@dataclass(frozen=True)
class SupervisionRun:
    start_seconds: float
    init_seconds: float
    """From the launch until the supervisor logged that it started (imports, configuration)."""
    programs_seconds: float
    """From then until its log shows the last program RUNNING (spawns, startsecs, polling)."""
    stop_seconds: float
    idle_cpu_seconds: float
    rss_bytes: int
    pss_bytes: int
    """PSS of the supervisor and its helper processes outside the sandboxes."""
    helpers: int
    pss_parts: dict[str, int]
    """That PSS by part: the supervisor process, its helpers, the sandboxes' inits."""


def measure(supervisor: Supervised, programs: int, idle_seconds: float) -> SupervisionRun:
    running_at = wait_until(
        lambda: supervisor.all_in_state("RUNNING"),
        STATE_TIMEOUT,
        f"{programs} programs RUNNING",
        STATE_POLL_SECONDS,
    )
    start_seconds = running_at - supervisor.launched_at
    initialised, last_running = supervisor.startup_marks()
    refs = supervisor.program_refs()
    if len(refs) != programs:
        raise BenchError(f"{len(refs)} program pids, expected {programs}")
    cpu_before, window_began = cpu_seconds(supervisor.pid), time.monotonic()
    time.sleep(idle_seconds)  # the measurement window itself
    window = time.monotonic() - window_began
    supervisor.check_alive()
    idle_cpu = (cpu_seconds(supervisor.pid) - cpu_before) * idle_seconds / window
    rss = rss_bytes(supervisor.pid)
    own = descendants_in_own_pid_namespace(supervisor.pid, {ref.pid for ref in refs})
    # The sandboxes' init is grenadine-sv's cost, not the program's: it counts too.
    inits = [
        ref.pid for ref in refs if Path(f"/proc/{ref.pid}/comm").read_text().strip() in INIT_NAMES
    ]
    parts = {
        "supervisor": pss_bytes(supervisor.pid),
        "helpers": sum(pss_bytes(pid) for pid in own if pid != supervisor.pid),
        "inits": sum(pss_bytes(pid) for pid in inits),
    }
    pss = sum(parts.values())
    stop_began = time.monotonic()
    supervisor.stop_all()
    stopped_at = wait_until(
        lambda: not any(ref.alive() for ref in refs),
        STATE_TIMEOUT,
        f"{programs} programs to end",
        STATE_POLL_SECONDS,
    )
    return SupervisionRun(
        start_seconds,
        initialised - supervisor.launched_wall,
        last_running - initialised,
        stopped_at - stop_began,
        idle_cpu,
        rss,
        pss,
        len(own) - 1,
        parts,
    )


def required_libraries_pss() -> int:
    """PSS of a bare interpreter that has imported the required libraries."""
    probe = subprocess.Popen(
        [sys.executable, "-c", REQUIRED_LIBRARIES_PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != "ready":
            raise BenchError("the required-libraries probe did not start")
        return pss_bytes(probe.pid)
    finally:
        probe.communicate(timeout=STATE_TIMEOUT)


def programs_for(settings: Settings) -> list[ProgramSpec]:
    return [
        ProgramSpec(name=f"idle{number:02d}", command=IDLE_SHELL, settings={"startsecs": 1})
        for number in range(settings.supervised_programs)
    ]


def run(settings: Settings) -> list[Comparison]:
    programs = programs_for(settings)
    kinds: dict[str, Callable[[Path, int], AbstractContextManager[Supervised]]] = {
        "grenadine-sv": lambda root, number: GrenadineSupervisor(
            root, programs, settings.profile(f"supervision-{number}")
        ),
        "supervisord": lambda root, number: Supervisord(root, programs),
    }
    runs: dict[str, list[SupervisionRun]] = {kind: [] for kind in kinds}
    floors: list[float] = []
    order = list(kinds)
    for number in range(settings.runs):
        for kind in order if number % 2 == 0 else reversed(order):
            with scratch_dir("gsvb-sup-") as root, kinds[kind](root, number) as supervisor:
                runs[kind].append(measure(supervisor, len(programs), settings.idle_seconds))
                if kind == "grenadine-sv":  # sharing libpython's pages as the supervisor did
                    floors.append(float(required_libraries_pss() + OWN_CODE_ALLOWANCE_BYTES))
    ours, theirs = runs["grenadine-sv"], runs["supervisord"]
    count = len(programs)
    case = f"3. supervise {count} programs"
    same = "grenadine-sv", "supervisord"
    details = {
        f"median_{part}_seconds_{kind}": round(
            statistics.median(getattr(r, f"{part}_seconds") for r in runs[kind]), 4
        )
        for part in ("init", "programs")
        for kind in kinds
    }
    return [
        Comparison(
            case,
            "launch to all RUNNING",
            "s",
            *same,
            tuple(r.start_seconds for r in ours),
            tuple(r.start_seconds for r in theirs),
            Target("<=", 1.0),
            details=details,
            note="both with startsecs = 1 (both defaults), programs `sh -c 'trap … TERM; "
            "sleep infinity & wait'`; from the supervisor's launch, states polled every 50 ms",
        ),
        Comparison(
            case,
            "stop all",
            "s",
            *same,
            tuple(r.stop_seconds for r in ours),
            tuple(r.stop_seconds for r in theirs),
            Target("<=", 1.0),
            note="`stop all` (control socket) against stopAllProcesses (XML-RPC), "
            "until every program's pid is gone",
        ),
        Comparison(
            case,
            f"idle CPU over {settings.idle_seconds:g} s",
            "CPU s",
            *same,
            tuple(r.idle_cpu_seconds for r in ours),
            tuple(r.idle_cpu_seconds for r in theirs),
            Target("<=", 1.0),
            note="user + system time of the supervisor process (10 ms resolution)",
        ),
        Comparison(
            case,
            "resident memory",
            "B",
            *same,
            tuple(float(r.rss_bytes) for r in ours),
            tuple(float(r.rss_bytes) for r in theirs),
            note="VmRSS of the supervisor process with all programs running",
        ),
        Comparison(
            case,
            "memory outside the sandboxes (PSS)",
            "B",
            *same,
            tuple(float(r.pss_bytes) for r in ours),
            tuple(float(r.pss_bytes) for r in theirs),
            Target("<=", 1.3),
            details={f"helper_processes_{k}": runs[k][0].helpers for k in kinds}
            | {
                f"median_pss_mib_{part}_{k}": round(
                    statistics.median(r.pss_parts[part] for r in runs[k]) / 2**20, 2
                )
                for part in ("supervisor", "helpers", "inits")
                for k in kinds
            },
            note="PSS of the supervisor and every process under it that is not a program "
            "(grenadine-sv: its sandbox launcher and stdio keeper), plus each sandbox's init "
            "(tini-static), all programs running",
        ),
        Comparison(
            case,
            "memory outside the sandboxes (PSS), against its floor",
            "B",
            "grenadine-sv",
            "required libraries + 5 MiB",
            tuple(float(r.pss_bytes) for r in ours),
            tuple(floors),
            Target("<=", 1.0),
            note="the same PSS against the issue's floor: a bare interpreter that imported "
            "trio, pydantic (one model validated), structlog, tomllib and blake3 (what the "
            "supervisor has loaded at that point), measured while the supervisor still ran, "
            "plus 5 MiB; the goal is met when either this row or the row above is",
        ),
    ]
