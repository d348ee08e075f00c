"""The supervisor's own logs: structlog, one short snake_case event per line with key=value context.

Program output (what the supervised daemons print) is not logged here; see `output.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["auto", "console", "json"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS: tuple[LogFormat, ...] = ("auto", "console", "json")
# In log_dir: the supervisor's own log, JSON lines, whatever stderr gets (`maintail`).
SUPERVISOR_LOG_FILE = "grenadine-sv.log"


class CopyToFile:
    """A structlog processor that appends each event to a file as a JSON line (0600), and
    passes it on unchanged to the renderer of stderr."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self._render = structlog.processors.JSONRenderer()
        self._exc_info = structlog.processors.format_exc_info

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        copy = self._exc_info(logger, method, dict(event))
        with contextlib.suppress(OSError, ValueError):  # a full disk must not stop logging
            rendered = self._render(logger, method, copy)
            text = rendered.decode() if isinstance(rendered, bytes) else rendered
            self._file.write(f"{text}\n")
        return event


def configure_logging(
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    also_to: Path | None = None,
) -> None:
    """Send every structlog logger's events at `level` or above to `stream` (default: stderr),
    and as JSON lines to the file `also_to` when given.

    `auto` renders for humans when `stream` is a terminal and as JSON lines otherwise.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    level_number = LEVELS.get(level.lower())
    if level_number is None:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    out = sys.stderr if stream is None else stream
    is_terminal = out.isatty()

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if also_to is not None:
        try:
            processors.append(CopyToFile(also_to))
        except OSError as exc:
            print(f"grenadine-sv: cannot write the log file {also_to}: {exc}", file=sys.stderr)
    if fmt == "console" or (fmt == "auto" and is_terminal):
        # ConsoleRenderer formats exceptions itself and warns if format_exc_info ran before it.
        processors.append(structlog.dev.ConsoleRenderer(colors=is_terminal))
    else:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
