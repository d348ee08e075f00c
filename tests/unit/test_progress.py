"""The progress line of a long checkpoint or restore: on a terminal only, from the dump that
is being written, erased at the end."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from grenadine_sv.cli import progress
from grenadine_sv.cli.progress import (
    bytes_being_written,
    progress_line,
    progress_text,
    state_dir_of,
)
from tests.integration.supervising import wait_until

MIB = 1 << 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def dump_in_progress(state_dir: Path, program: str, size: int) -> None:
    criu = state_dir / "images" / program / ".partial-0123" / "criu"
    criu.mkdir(parents=True)
    (criu / "pages-1.img").write_bytes(b"\0" * size)


def test_text_gives_time_written_and_throughput() -> None:
    assert progress_text("restore web", 1.25, None) == "restore web: 1.2s"
    assert progress_text("checkpoint web", 2.0, 64 * MIB) == (
        "checkpoint web: 2.0s, 64.0 MiB written, 32.0 MiB/s"
    )


def test_only_dumps_in_progress_of_the_programs_count(tmp_path: Path) -> None:
    dump_in_progress(tmp_path, "web", 3 * MIB)
    dump_in_progress(tmp_path, "other", MIB)
    (tmp_path / "images" / "web" / ("0" * 32)).mkdir()  # a listed image does not count
    assert bytes_being_written(tmp_path / "images", ["web"]) == 3 * MIB


def test_a_terminal_gets_a_line_redrawn_then_erased(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    dump_in_progress(tmp_path, "web", 2 * MIB)
    terminal = Terminal()
    with progress_line("checkpoint web", tmp_path, ["web"], terminal):
        wait_until(lambda: "MiB written" in terminal.getvalue(), 10.0, "a progress line")
    text = terminal.getvalue()
    assert "\r\033[Kcheckpoint web: " in text
    assert ", 2.0 MiB written, " in text
    assert text.endswith("\r\033[K")


def test_nothing_when_not_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    pipe = io.StringIO()
    with progress_line("checkpoint web", tmp_path, ["web"], pipe):
        pass
    assert pipe.getvalue() == ""


def test_state_dir_is_read_from_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "grenadine.toml"
    config.write_text('[supervisor]\nstate_dir = "state"\n')
    assert state_dir_of(config) == tmp_path / "state"
    config.write_text("[programs.x]\n")
    assert state_dir_of(config) == Path("/var/lib/grenadine-sv")
