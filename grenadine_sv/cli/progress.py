"""A progress line on stderr while a checkpoint or a restore takes more than a second: time
so far and, for a checkpoint, what the dump has written and how fast (read from the image
being written in state_dir). Only on a terminal. Standard library only."""

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

DEFAULT_STATE_DIR = Path("/var/lib/grenadine-sv")
QUIET_SECONDS = 1.0
REFRESH_SECONDS = 0.25
MIB = 1 << 20


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
