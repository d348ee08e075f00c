"""Where the supervisor's time goes: py-spy attached to it for the length of a case, and a
summary of the samples by the innermost grenadine_sv frame of each."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from pathlib import Path

from tests.bench.procs import BenchError

SAMPLES_PER_SECOND = 250
STOP_GRACE = 60.0
SHOWN_FRAMES = 25


def find_py_spy(given: str | None) -> str:
    found = shutil.which(given or "py-spy")
    if found is None:
        raise BenchError(
            f"py-spy not found ({given or 'py-spy on PATH'}): pip install py-spy, "
            "or name it with --py-spy PATH"
        )
    return found


class PySpy:
    """`py-spy record` on a running pid, raw (collapsed stacks) output, idle samples kept so
    that time blocked in CRIU, fsync or sleeps shows up."""

    def __init__(self, py_spy: str, pid: int, output: Path) -> None:
        self.output = output
        self._process = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--idle",
                "--threads",
                "--rate",
                str(SAMPLES_PER_SECOND),
                "--format",
                "raw",
                "--output",
                str(output),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """End the recording (SIGINT makes py-spy write its file) and summarise it."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self.output.exists():
            summary = summarize(self.output.read_text())
            self.output.with_suffix(".summary.txt").write_text(summary)


def summarize(collapsed: str) -> str:
    """Samples by thread kind and by innermost grenadine_sv frame, busiest first; samples in
    the event loop's epoll wait and in idle worker threads are counted apart as idle."""
    by_frame: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        thread = "main" if "MainThread" in frames[0] else "worker"
        innermost = frames[-1]
        if "epoll" in innermost or innermost.startswith("WorkerThread._work"):
            by_frame[f"{thread}: idle"] += samples
            continue
        ours = next((f for f in reversed(frames) if "grenadine_sv/" in f), innermost)
        by_frame[f"{thread}: {ours}"] += samples
    seconds = 1 / SAMPLES_PER_SECOND
    lines = [f"{total} samples at {SAMPLES_PER_SECOND}/s, all threads"]
    lines += [
        f"{n:7d} {n * seconds:8.2f} s  {frame}" for frame, n in by_frame.most_common(SHOWN_FRAMES)
    ]
    return "\n".join(lines) + "\n"
