"""Progress on a terminal, standard library only: TerminalProgress for a transfer of known
size, and progress_line for a checkpoint or restore that takes more than a second (time so
far and, for a checkpoint, how long the program has been frozen, what the dump has written
and how fast, read from the image being written in state_dir)."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from grenadine_sv.control.client import beside_config, supervisor_settings

MIB = 1024 * 1024
# Redraw at most this often.
REDRAW_SECONDS = 0.2


class TerminalProgress:
    """Draws "LABEL: 120.0 of 512.0 MiB (23%), 95.1 MiB/s" on `stream`, rewriting the line;
    `done` ends it. Meant to be passed as a progress callback when `stream` is a terminal."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.began = time.monotonic()
        self._drawn = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._drawn < REDRAW_SECONDS and done < total:
            return
        self._drawn = now
        percent = 100 * done // total if total else 100
        rate = done / MIB / max(now - self.began, 1e-6)
        self.stream.write(
            f"\r{self.label}: {done / MIB:.1f} of {total / MIB:.1f} MiB ({percent}%), "
            f"{rate:.1f} MiB/s\x1b[K"
        )
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


DEFAULT_STATE_DIR = Path("/var/lib/grenadine-sv")
QUIET_SECONDS = 1.0
REFRESH_SECONDS = 0.25


def state_dir_of(config_path: str) -> Path:
    """The state_dir a configuration names, read without validating the rest of it."""
    value = (supervisor_settings(config_path) or {}).get("state_dir")
    if not isinstance(value, str) or not value:
        return DEFAULT_STATE_DIR
    return Path(beside_config(config_path, value))


def watched_programs(images: Path, programs: list[str]) -> list[str]:
    """The programs named, or every program with images for `all` or none named."""
    if programs and not {"", "all"} & set(programs):
        return programs
    try:
        return sorted(entry.name for entry in images.iterdir() if entry.is_dir())
    except OSError:
        return []


def bytes_being_written(images: Path, programs: list[str]) -> int:
    """Bytes in the dumps in progress (`.partial-*` directories) of these programs."""
    total = 0
    for program in programs:
        for partial in (images / program).glob(".partial-*"):
            for directory, _, files in os.walk(partial):
                for name in files:
                    try:
                        total += (Path(directory) / name).lstat().st_size
                    except OSError:
                        continue
    return total


# CRIU's log lines start with the seconds since it started: `(00.038696) ...`. It logs
# `Seized task N` once it holds the tree frozen, and `Unfreezing tasks into 1` (TASK_ALIVE)
# when it lets it run on; a tree it leaves stopped (checkpoint --stop) stays frozen.
LOG_TIME = re.compile(r"^\(\s*([0-9]+\.[0-9]+)\)")
FROZEN_MARK = "Seized task "
THAWED_MARK = "Unfreezing tasks into 1"
DUMP_LOGS = ".partial-*/criu/dump.log"


class FreezeWatch:
    """How long the programs being dumped have been frozen, read from the logs CRIU writes
    into their partial images (a line is read up to REFRESH_SECONDS late: the log's own
    timestamps move the moments back by what CRIU logged since)."""

    # Not a dataclass: importing dataclasses (and inspect) costs each command ~5 ms.
    def __init__(self) -> None:
        self.offsets: dict[Path, int] = {}
        self.frozen_at: dict[Path, float] = {}
        self.thawed_at: dict[Path, float] = {}

    def frozen_seconds(self, images: Path, programs: list[str], now: float) -> float | None:
        """The longest freeze among the dumps of `programs`, None before any was seen."""
        logs = {log for program in programs for log in (images / program).glob(DUMP_LOGS)}
        for log in logs:
            self._read(log, now)
        for log in self.frozen_at.keys() - logs - self.thawed_at.keys():
            self.thawed_at[log] = now  # listed (renamed) or given up: no longer dumping
        if not self.frozen_at:
            return None
        return max(self.thawed_at.get(log, now) - at for log, at in self.frozen_at.items())

    def _read(self, log: Path, now: float) -> None:
        try:
            with log.open("rb") as reader:
                reader.seek(self.offsets.get(log, 0))
                chunk = reader.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offsets[log] = self.offsets.get(log, 0) + len(complete)
        newest: float | None = None
        marks: dict[str, float] = {}
        for line in complete.decode(errors="replace").splitlines():
            stamp = LOG_TIME.match(line)
            if stamp is None:
                continue
            newest = float(stamp.group(1))
            for mark in (FROZEN_MARK, THAWED_MARK):
                if mark in line:
                    marks.setdefault(mark, newest)
        if newest is None:
            return
        if FROZEN_MARK in marks:
            self.frozen_at.setdefault(log, now - (newest - marks[FROZEN_MARK]))
        if THAWED_MARK in marks and log in self.frozen_at:
            self.thawed_at.setdefault(log, now - (newest - marks[THAWED_MARK]))


def progress_text(
    action: str, elapsed: float, written: int | None, frozen: float | None = None
) -> str:
    """`checkpoint cache: 2.4s, frozen 1.9s, 310.2 MiB written, 129.3 MiB/s` (or less)."""
    text = f"{action}: {elapsed:.1f}s"
    if frozen is not None:
        text += f", frozen {frozen:.1f}s"
    if written:
        rate = written / MIB / elapsed if elapsed > 0 else 0.0
        text += f", {written / MIB:.1f} MiB written, {rate:.1f} MiB/s"
    return text


@contextmanager
def progress_line(
    action: str, state_dir: Path | None, programs: list[str], err: TextIO = sys.stderr
) -> Iterator[None]:
    """While the body runs: after a quiet second, a line on `err` redrawn in place, erased
    at the end. Nothing at all when `err` is not a terminal."""
    if not err.isatty():
        yield
        return
    done = threading.Event()
    began = time.monotonic()
    images = state_dir / "images" if state_dir is not None else None
    freezes = FreezeWatch()

    def draw() -> None:
        shown = False
        # The logs are read from the start: a large program's freeze may be over in a second.
        while not done.wait(REFRESH_SECONDS):
            now = time.monotonic()
            names = watched_programs(images, programs) if images is not None else []
            frozen = freezes.frozen_seconds(images, names, now) if images else None
            if now - began < QUIET_SECONDS:
                continue
            written = bytes_being_written(images, names) if images is not None else None
            err.write("\r\033[K" + progress_text(action, now - began, written, frozen))
            err.flush()
            shown = True
        if shown:
            err.write("\r\033[K")
            err.flush()

    drawer = threading.Thread(target=draw, name="progress", daemon=True)
    drawer.start()
    try:
        yield
    finally:
        done.set()
        drawer.join()
