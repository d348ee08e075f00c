from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from grenadine_sv.logs import configure_logging

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_output_holds_the_event_bound_keys_level_and_utc_time() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    structlog.get_logger(program="memcached").info("program_started", pid=4242)
    [entry] = json_lines(stream)
    assert entry["event"] == "program_started"
    assert entry["program"] == "memcached"
    assert entry["pid"] == 4242
    assert entry["level"] == "info"
    assert ISO_UTC.match(entry["timestamp"])


def test_auto_writes_json_when_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("auto", stream=stream)
    structlog.get_logger().warning("checkpoint_failed", image_id="abc")
    [entry] = json_lines(stream)
    assert ISO_UTC.match(entry.pop("timestamp"))
    assert entry == {"event": "checkpoint_failed", "image_id": "abc", "level": "warning"}


@pytest.mark.parametrize("fmt", ["auto", "console"])
def test_console_output_for_people(fmt: str) -> None:
    stream = FakeTerminal() if fmt == "auto" else io.StringIO()
    configure_logging(fmt, stream=stream)  # type: ignore[arg-type]
    structlog.get_logger(program="redis").info("program_ready", pid=7)
    text = stream.getvalue()
    assert "program_ready" in text
    assert "program" in text
    assert "redis" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_without_a_terminal_has_no_colour_codes() -> None:
    stream = io.StringIO()
    configure_logging("console", stream=stream)
    structlog.get_logger().info("supervisor_started")
    assert "\x1b[" not in stream.getvalue()


def test_events_below_the_level_are_dropped() -> None:
    stream = io.StringIO()
    configure_logging("json", level="WARNING", stream=stream)
    log = structlog.get_logger()
    log.info("quiet")
    log.debug("quieter")
    log.error("loud")
    assert [entry["event"] for entry in json_lines(stream)] == ["loud"]


def test_debug_level_keeps_debug_events() -> None:
    stream = io.StringIO()
    configure_logging("json", level="debug", stream=stream)
    structlog.get_logger().debug("probe_attempt")
    assert [entry["event"] for entry in json_lines(stream)] == ["probe_attempt"]


def fail_restore() -> None:
    raise RuntimeError("criu said no")


def test_json_exceptions_become_a_traceback_string() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        fail_restore()
    except RuntimeError:
        structlog.get_logger().exception("restore_failed")
    [entry] = json_lines(stream)
    assert entry["level"] == "error"
    assert "RuntimeError: criu said no" in entry["exception"]


def test_context_variables_are_merged() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    with structlog.contextvars.bound_contextvars(program="memcached"):
        structlog.get_logger().info("program_stopped")
    [entry] = json_lines(stream)
    assert entry["program"] == "memcached"


def test_unknown_level_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose': use one of debug, info"):
        configure_logging("json", level="verbose", stream=io.StringIO())


def test_unknown_format_is_rejected_with_the_choices() -> None:
    with pytest.raises(
        ValueError, match="unknown log format 'xml': use one of auto, console, json"
    ):
        configure_logging("xml", stream=io.StringIO())  # type: ignore[arg-type]
