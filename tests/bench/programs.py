"""The programs the benchmarks supervise, as command lines and program definitions."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from tests.bench.grenadine import GrenadineSupervisor, ProgramSpec
from tests.bench.procs import wait_until

PAYLOADS = Path(__file__).resolve().parent / "payloads"
PROGRAM_START_TIMEOUT = 120.0

# Stays up until SIGTERM, which it handles (a PID 1 ignores signals it has no handler for), and
# leaves no process behind: the sleep is ended by the trap.
IDLE_SHELL = ("/bin/sh", "-c", "trap 'kill $! 2>/dev/null; exit 0' TERM; sleep infinity & wait")


def memory_hog(name: str, mebibytes: int, checkpoint: dict[str, object]) -> ProgramSpec:
    return ProgramSpec(
        name=name,
        command=(sys.executable, "-u", str(PAYLOADS / "memory_hog.py"), str(mebibytes)),
        settings={"startsecs": 0.2},
        checkpoint=checkpoint,
    )


def warm_service(name: str, port: int, documents: int) -> ProgramSpec:
    return ProgramSpec(
        name=name,
        command=(
            sys.executable,
            "-u",
            str(PAYLOADS / "warm_service.py"),
            str(port),
            str(documents),
        ),
        settings={
            "autostart": False,
            "ready": {"tcp": f"127.0.0.1:{port}", "timeout": "300s"},
            "stopwaitsecs": 10,
            # A failed restore must fail the benchmark, not turn into a cold start.
            "restore_fallback": "fail",
        },
    )


def wait_hogs_ready(sv: GrenadineSupervisor, names: list[str]) -> None:
    """Until every memory hog is RUNNING and has written all its pages."""
    wait_until(
        lambda: (
            sv.all_in_state("RUNNING", names)
            and all("ready" in sv.stdout_of(name) for name in names)
        ),
        PROGRAM_START_TIMEOUT,
        f"{len(names)} memory hogs to be RUNNING and ready; log: {sv.log_tail()}",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
