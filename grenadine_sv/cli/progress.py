"""A one-line progress report on a terminal (standard library only)."""

from __future__ import annotations

import time
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
