"""Progress on a terminal, standard library only: TerminalProgress for a transfer of known
size, and progress_line for a checkpoint or restore that takes more than a second (time so
far and, for a checkpoint, what the dump has written and how fast, read from the image being
written in state_dir)."""

from __future__ import annotations

import os
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

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


def state_dir_of(config_path: Path) -> Path:
    """The state_dir a configuration names, read without validating the rest of it."""
    try:
        document = tomllib.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return DEFAULT_STATE_DIR
    settings = document.get("supervisor", {})
    value = settings.get("state_dir") if isinstance(settings, dict) else None
    if not isinstance(value, str) or not value:
        return DEFAULT_STATE_DIR
    return (config_path.parent / value).resolve(strict=False)


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


def progress_text(action: str, elapsed: float, written: int | None) -> str:
    """`checkpoint cache: 2.4s, 310.2 MiB written, 129.3 MiB/s` (or just the time)."""
    text = f"{action}: {elapsed:.1f}s"
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

    def draw() -> None:
        if done.wait(QUIET_SECONDS):
            return
        while not done.is_set():
            written = bytes_being_written(images, programs) if images is not None else None
            err.write("\r\033[K" + progress_text(action, time.monotonic() - began, written))
            err.flush()
            done.wait(REFRESH_SECONDS)
        err.write("\r\033[K")
        err.flush()

    drawer = threading.Thread(target=draw, name="progress", daemon=True)
    drawer.start()
    try:
        yield
    finally:
        done.set()
        drawer.join()
