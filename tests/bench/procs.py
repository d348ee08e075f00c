"""Processes and scratch space for the benchmarks: bounded waits, ending by pid, /proc figures."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.01


class BenchError(Exception):
    """A benchmark could not be run or measured; the message says what to look at."""


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = POLL_SECONDS
) -> float:
    """Poll `predicate` every `interval` seconds until it holds and return the time it became
    true (monotonic); raise BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private directory under /tmp (short, for Unix socket paths), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ")".
    return text.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid`, all its threads (living and ended) together."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pss_bytes(pid: int) -> int:
    """Proportional set size of `pid` (shared pages divided among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/smaps_rollup has no Pss line")


def descendants_in_own_pid_namespace(pid: int, programs: Collection[int] = ()) -> list[int]:
    """`pid` and its descendants that share its PID namespace, without `programs` and theirs:
    a supervisor's own helper processes (launcher, CRIU, stdio keeper), not its programs."""
    own = os.stat(f"/proc/{pid}/ns/pid").st_ino
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        try:
            if current in programs or os.stat(f"/proc/{current}/ns/pid").st_ino != own:
                continue
            found.append(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/status has no VmRSS line (is {pid} a kernel thread?)")


@dataclass(frozen=True)
class ProcessRef:
    """A pid with its start time, so that a recycled pid is never signalled."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, start_ticks(pid))

    def alive(self) -> bool:
        try:
            fields = _stat_fields(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            return False
        return int(fields[19]) == self.started and fields[0] != "Z"

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def end_leftovers(processes: Sequence[ProcessRef], timeout: float = 10.0) -> None:
    """SIGKILL whichever of `processes` still run, and wait until they are gone."""
    for process in processes:
        process.kill()
    wait_until(
        lambda: not any(p.alive() for p in processes),
        timeout,
        f"leftover programs {[p.pid for p in processes if p.alive()]} to end",
    )


def end_child(child: subprocess.Popen[bytes], grace: float) -> int:
    """Ask `child` to stop (SIGTERM), kill it after `grace` seconds, reap it; its exit code."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            return child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.kill()
    return child.wait()


def run_checked(argv: Sequence[str], what: str, timeout: float = 600.0) -> str:
    """Run a command to its end; its stdout. BenchError with its stderr when it fails."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: no end within {timeout:g} s ({' '.join(argv)})") from exc
    if result.returncode != 0:
        raise BenchError(
            f"{what} failed with exit code {result.returncode}: {result.stderr.strip()[-2000:]}"
        )
    return result.stdout
