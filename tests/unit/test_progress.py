"""The progress line of a long checkpoint or restore: on a terminal only, from the dump that
is being written, erased at the end."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from grenadine_sv.cli import progress
from grenadine_sv.cli.progress import (
    FreezeWatch,
    bytes_being_written,
    progress_line,
    progress_text,
    state_dir_of,
    watched_programs,
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


def test_text_gives_time_frozen_written_and_throughput() -> None:
    assert progress_text("restore web", 1.25, None) == "restore web: 1.2s"
    assert progress_text("checkpoint web", 2.0, 64 * MIB) == (
        "checkpoint web: 2.0s, 64.0 MiB written, 32.0 MiB/s"
    )
    assert progress_text("checkpoint web", 2.0, 64 * MIB, 1.46) == (
        "checkpoint web: 2.0s, frozen 1.5s, 64.0 MiB written, 32.0 MiB/s"
    )


def dump_log(state_dir: Path, program: str) -> Path:
    criu = state_dir / "images" / program / ".partial-0123" / "criu"
    criu.mkdir(parents=True)
    return criu / "dump.log"


def append(log: Path, text: str) -> None:
    with log.open("a") as writer:
        writer.write(text)


def test_the_freeze_is_timed_from_criu_s_log(tmp_path: Path) -> None:
    log = dump_log(tmp_path, "web")
    watch = FreezeWatch()
    images = tmp_path / "images"
    append(log, "(00.001000) Will take pid namespace\n(00.010000) Seized task 5, state 0\n")
    assert watch.frozen_seconds(images, ["other"], now=100.0) is None
    append(log, "(00.050000) Dumping task 5\n(00.0600")  # an unfinished line waits
    # Seen at 100.0, logged 0.04 s before the newest complete line: frozen since 99.96.
    assert watch.frozen_seconds(images, ["web"], now=100.0) == pytest.approx(0.04)
    assert watch.frozen_seconds(images, ["web"], now=101.0) == pytest.approx(1.04)
    append(log, "00) x\n(00.300000) Unfreezing tasks into 1\n(00.310000) Writing stats\n")
    assert watch.frozen_seconds(images, ["web"], now=102.0) == pytest.approx(2.03)
    assert watch.frozen_seconds(images, ["web"], now=110.0) == pytest.approx(2.03)


def test_a_tree_left_stopped_is_frozen_until_its_image_is_listed(tmp_path: Path) -> None:
    log = dump_log(tmp_path, "web")
    watch = FreezeWatch()
    images = tmp_path / "images"
    append(log, "(00.010000) Seized task 5, state 0\n(00.300000) Unfreezing tasks into 3\n")
    assert watch.frozen_seconds(images, ["web"], now=100.0) == pytest.approx(0.29)
    assert watch.frozen_seconds(images, ["web"], now=101.0) == pytest.approx(1.29)
    log.parent.parent.rename(images / "web" / ("0" * 32))  # listed
    assert watch.frozen_seconds(images, ["web"], now=102.0) == pytest.approx(2.29)
    assert watch.frozen_seconds(images, ["web"], now=109.0) == pytest.approx(2.29)


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


def test_all_or_no_name_watches_every_program(tmp_path: Path) -> None:
    dump_in_progress(tmp_path, "web", 3 * MIB)
    dump_in_progress(tmp_path, "db", MIB)
    images = tmp_path / "images"
    assert watched_programs(images, ["web"]) == ["web"]
    assert watched_programs(images, ["all"]) == ["db", "web"]
    assert watched_programs(images, [""]) == ["db", "web"]
    assert watched_programs(tmp_path / "none", []) == []
