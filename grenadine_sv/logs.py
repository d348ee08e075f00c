"""The supervisor's own logs: structlog, one short snake_case event per line with key=value context.

Program output (what the supervised daemons print) is not logged here; see `output.py`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

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


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send every structlog logger's events at `level` or above to `stream` (default: stderr).

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
