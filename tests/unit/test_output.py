from __future__ import annotations

import fcntl
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from grenadine_sv.store.trust import UntrustedPath
from grenadine_sv.supervisor import output as output_module
from grenadine_sv.supervisor.output import (
    RotatingLogFile,
    follow,
    format_line_prefix,
    open_output_pipe,
    pump_output,
)

FAST_POLL = 0.01


def read(path: Path) -> bytes:
    return path.read_bytes()


def log_files(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


class StepClock:
    """Returns 05:30:00.123 UTC, then one second later at each call."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 5, 30, 0, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        moment = self.now
        self.now += timedelta(seconds=1)
        return moment


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


# --- RotatingLogFile -------------------------------------------------------------------


@pytest.mark.usefixtures("umask_022")
def test_creates_parent_directories_and_file_with_restricted_modes(tmp_path: Path) -> None:
    path = tmp_path / "log" / "programs" / "app.out"
    with RotatingLogFile(path, max_bytes=100, backups=1) as sink:
        sink.write(b"hello\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o750
    assert read(path) == b"hello\n"


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    path.write_bytes(b"before\n")
    with RotatingLogFile(path, max_bytes=100, backups=1) as sink:
        sink.write(b"after\n")
    assert read(path) == b"before\nafter\n"


def test_rotates_and_keeps_only_the_newest_backups(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=10, backups=2) as sink:
        for number in range(5):
            sink.write(f"line-{number}\n".encode())  # 7 bytes: one line per file
    assert log_files(tmp_path) == ["app.out", "app.out.1", "app.out.2"]
    assert read(path) == b"line-4\n"
    assert read(tmp_path / "app.out.1") == b"line-3\n"
    assert read(tmp_path / "app.out.2") == b"line-2\n"


def test_fills_a_file_up_to_max_bytes_before_rotating(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=12, backups=3) as sink:
        for letter in "abcde":
            sink.write(f"{letter * 3}\n".encode())  # 4 bytes: three lines per file
    assert read(tmp_path / "app.out.1") == b"aaa\nbbb\nccc\n"
    assert read(path) == b"ddd\neee\n"


def test_rotates_before_a_line_that_would_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=10, backups=1) as sink:
        sink.write(b"abcdef\n")
        sink.write(b"ghijkl\n")
    assert read(tmp_path / "app.out.1") == b"abcdef\n"
    assert read(path) == b"ghijkl\n"


def test_splits_one_write_only_between_lines(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=10, backups=3) as sink:
        sink.write(b"1234\n5678\nabcdef\nxy\n")
    assert read(tmp_path / "app.out.1") == b"1234\n5678\n"
    assert read(path) == b"abcdef\nxy\n"


def test_cuts_a_line_longer_than_a_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=4, backups=5) as sink:
        sink.write(b"ab\n")
        sink.write(b"0123456789\n")
    assert read(tmp_path / "app.out.3") == b"ab\n"
    assert read(tmp_path / "app.out.2") == b"0123"
    assert read(tmp_path / "app.out.1") == b"4567"
    assert read(path) == b"89\n"


def test_no_file_grows_beyond_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=16, backups=200) as sink:
        for number in range(40):
            sink.write(b"x" * (number % 7) + b"\n" + b"y" * (number % 23))
    sizes = [entry.stat().st_size for entry in tmp_path.iterdir()]
    assert max(sizes) <= 16
    assert sum(sizes) == sum(number % 7 + 1 + number % 23 for number in range(40))


def test_backups_zero_truncates(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=10, backups=0) as sink:
        sink.write(b"first\n")
        sink.write(b"second\n")
    assert log_files(tmp_path) == ["app.out"]
    assert read(path) == b"second\n"


def test_max_bytes_zero_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=3) as sink:
        for _ in range(100):
            sink.write(b"0123456789\n")
    assert log_files(tmp_path) == ["app.out"]
    assert path.stat().st_size == 1100


def test_size_counts_what_the_file_already_holds(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    path.write_bytes(b"12345678\n")
    with RotatingLogFile(path, max_bytes=10, backups=1) as sink:
        sink.write(b"abc\n")
    assert read(tmp_path / "app.out.1") == b"12345678\n"
    assert read(path) == b"abc\n"


@pytest.mark.parametrize(("max_bytes", "backups"), [(-1, 1), (10, -1)])
def test_rejects_negative_settings(tmp_path: Path, max_bytes: int, backups: int) -> None:
    with pytest.raises(ValueError, match="use 0"):
        RotatingLogFile(tmp_path / "app.out", max_bytes=max_bytes, backups=backups)


def test_write_after_close_is_an_error(tmp_path: Path) -> None:
    sink = RotatingLogFile(tmp_path / "app.out", max_bytes=10, backups=1)
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="is closed"):
        sink.write(b"late\n")


# --- timestamps ------------------------------------------------------------------------


def test_line_prefix_is_iso_utc_with_milliseconds() -> None:
    paris_winter = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 27, 6, 30, 0, 123999, tzinfo=paris_winter)
    assert format_line_prefix(moment) == b"2026-11-27T05:30:00.123Z "


def test_timestamps_prefix_every_line(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=0, timestamps=True, clock=StepClock()) as sink:
        sink.write(b"one\n\ntwo\n")
        sink.write(b"three\n")
    assert read(path) == (
        b"2026-11-27T05:30:00.123Z one\n"
        b"2026-11-27T05:30:00.123Z \n"
        b"2026-11-27T05:30:00.123Z two\n"
        b"2026-11-27T05:30:01.123Z three\n"
    )


def test_timestamps_a_line_split_across_writes_once(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=0, timestamps=True, clock=StepClock()) as sink:
        sink.write(b"hel")
        sink.write(b"lo\nwor")
        sink.write(b"ld\n")
    assert read(path) == b"2026-11-27T05:30:00.123Z hello\n2026-11-27T05:30:01.123Z world\n"


def test_timestamped_lines_rotate_whole(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    prefix_bytes = len(b"2026-11-27T05:30:00.123Z ")
    with RotatingLogFile(
        path, max_bytes=2 * (prefix_bytes + 2), backups=1, timestamps=True, clock=StepClock()
    ) as sink:
        sink.write(b"a\nb\nc\n")
    assert read(tmp_path / "app.out.1") == (
        b"2026-11-27T05:30:00.123Z a\n2026-11-27T05:30:00.123Z b\n"
    )
    assert read(path) == b"2026-11-27T05:30:00.123Z c\n"


# --- tail ------------------------------------------------------------------------------


def test_tail_reads_the_end_of_the_current_file(tmp_path: Path) -> None:
    with RotatingLogFile(tmp_path / "app.out", max_bytes=0, backups=0) as sink:
        assert sink.tail(10) == b""
        sink.write(b"0123456789abcdef\n")
        assert sink.tail(4) == b"def\n"
        assert sink.tail(1000) == b"0123456789abcdef\n"
        assert sink.tail(0) == b""


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    sink = RotatingLogFile(tmp_path / "app.out", max_bytes=0, backups=0)
    sink.close()
    (tmp_path / "app.out").unlink()
    assert sink.tail(10) == b""


# --- pipes and pumping -----------------------------------------------------------------


async def run_child_into_pipe(code: str, sink: RotatingLogFile) -> int:
    """Run `python -c code` with stdout on a new pipe, pump it into `sink`, return the exit code."""
    write_fd, read_stream = open_output_pipe()
    async with read_stream:
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", code], stdout=write_fd
            )
        finally:
            os.close(write_fd)
        try:
            with trio.fail_after(10):
                await pump_output(read_stream, sink)
                return await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_open_output_pipe_ends_are_not_inheritable() -> None:
    write_fd, read_stream = open_output_pipe()
    async with read_stream:
        try:
            assert not os.get_inheritable(write_fd)
            assert not os.get_inheritable(read_stream.fileno())
        finally:
            os.close(write_fd)


async def test_pump_copies_a_child_output_until_eof(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=0) as sink:
        code = "import sys\nfor n in range(3): print('line', n)\nsys.stdout.write('no newline')"
        assert await run_child_into_pipe(code, sink) == 0
    assert read(path) == b"line 0\nline 1\nline 2\nno newline"


async def test_pump_copies_more_than_a_pipe_buffer(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=0) as sink:
        code = "import sys\nsys.stdout.write('x' * 300_000)"
        assert await run_child_into_pipe(code, sink) == 0
    assert read(path) == b"x" * 300_000


async def test_pump_restarts_on_a_new_pipe_for_the_same_sink(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    with RotatingLogFile(path, max_bytes=0, backups=0, timestamps=True, clock=StepClock()) as sink:
        assert await run_child_into_pipe("print('before checkpoint', end='')", sink) == 0
        assert await run_child_into_pipe("print(' and after restore')", sink) == 0
    assert read(path) == b"2026-11-27T05:30:00.123Z before checkpoint and after restore\n"


class FailingSink(RotatingLogFile):
    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path, max_bytes=0, backups=0)
        self.failures = failures

    def write(self, data: bytes | bytearray) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().write(data)


async def test_pump_keeps_draining_when_writes_fail(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    send, receive = trio.testing.memory_stream_one_way_pair()
    with FailingSink(path, failures=2) as sink, capture_logs() as events:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_output, receive, sink)
            for chunk in (b"lost-1\n", b"lost-2\n", b"kept\n"):
                await send.send_all(chunk)
                await trio.testing.wait_all_tasks_blocked()
            await send.aclose()
    assert read(path) == b"kept\n"
    assert [event["event"] for event in events] == [
        "program_output_write_failed",
        "program_output_write_recovered",
    ]
    assert events[0]["path"] == str(path)


# --- follow ----------------------------------------------------------------------------


async def read_until(chunks: AsyncIterator[bytes], received: bytearray, expected: bytes) -> None:
    while not received.endswith(expected):
        received += await anext(chunks)


async def test_follow_starts_near_the_end_then_yields_new_data(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    received = bytearray()
    with RotatingLogFile(path, max_bytes=0, backups=0) as sink, trio.fail_after(5):
        sink.write(b"old line\nlast\n")
        async with aclosing(follow(path, from_end_bytes=5, poll_seconds=FAST_POLL)) as chunks:
            await read_until(chunks, received, b"last\n")
            sink.write(b"new ")
            sink.write(b"data\n")
            await read_until(chunks, received, b"new data\n")
    assert bytes(received) == b"last\nnew data\n"


async def test_follow_continues_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    received = bytearray()
    with RotatingLogFile(path, max_bytes=20, backups=2) as sink, trio.fail_after(5):
        sink.write(b"first\n")
        async with aclosing(follow(path, from_end_bytes=6, poll_seconds=FAST_POLL)) as chunks:
            await read_until(chunks, received, b"first\n")
            sink.write(b"second\n")
            sink.write(b"third\n")
            sink.write(b"rotated\n")
            sink.write(b"last\n")
            await read_until(chunks, received, b"last\n")
    assert (tmp_path / "app.out.1").read_bytes() == b"first\nsecond\nthird\n"
    assert bytes(received) == b"first\nsecond\nthird\nrotated\nlast\n"


async def test_follow_restarts_from_the_top_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "app.out"
    received = bytearray()
    with RotatingLogFile(path, max_bytes=20, backups=0) as sink, trio.fail_after(5):
        sink.write(b"a long first line\n")
        async with aclosing(follow(path, from_end_bytes=100, poll_seconds=FAST_POLL)) as chunks:
            await read_until(chunks, received, b"first line\n")
            sink.write(b"short\n")
            await read_until(chunks, received, b"short\n")
    assert bytes(received) == b"a long first line\nshort\n"


async def test_follow_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "later.out"
    received = bytearray()

    async def collect(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with aclosing(follow(path, from_end_bytes=0, poll_seconds=FAST_POLL)) as chunks:
            task_status.started()
            await read_until(chunks, received, b"hello\n")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(collect)
            await trio.testing.wait_all_tasks_blocked()  # the follower is polling for the file
            with RotatingLogFile(path, max_bytes=0, backups=0) as sink:
                sink.write(b"hello\n")
    assert bytes(received) == b"hello\n"


async def test_follow_rejects_a_negative_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        async with aclosing(follow(tmp_path / "app.out", from_end_bytes=-1)) as chunks:
            await anext(chunks)


def count_directory_walks(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    walked: list[Path] = []
    real = output_module.open_trusted_dir

    def counting(path: Path, **options: object) -> int:
        walked.append(path)
        return real(path, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(output_module, "open_trusted_dir", counting)
    return walked


def test_log_files_of_one_directory_walk_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked = count_directory_walks(monkeypatch)
    directory = tmp_path / "logs"
    sinks = [RotatingLogFile(directory / f"p{n}.log", max_bytes=0, backups=0) for n in range(4)]
    for sink in sinks:
        sink.write(b"x\n")
        sink.close()

    assert walked == [directory]
    assert all(read(directory / f"p{n}.log") == b"x\n" for n in range(4))


def test_a_log_directory_replaced_since_is_walked_and_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked = count_directory_walks(monkeypatch)
    directory = tmp_path / "logs"
    RotatingLogFile(directory / "a.log", max_bytes=0, backups=0).close()
    directory.rename(tmp_path / "old-logs")
    directory.mkdir()
    os.chmod(directory, 0o777)  # the new one is open to every user

    with pytest.raises(UntrustedPath, match="writable by other users"):
        RotatingLogFile(directory / "b.log", max_bytes=0, backups=0)

    os.chmod(directory, 0o750)
    with RotatingLogFile(directory / "b.log", max_bytes=0, backups=0) as sink:
        sink.write(b"new\n")
    assert read(directory / "b.log") == b"new\n"
    assert not (tmp_path / "old-logs" / "b.log").exists()
    assert walked == [directory] * 2, (
        "the first and the last open walk; the refused one stops sooner"
    )


async def test_output_pipes_are_enlarged_to_the_size_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe_max_size = tmp_path / "pipe-max-size"
    pipe_max_size.write_text(f"{128 * 1024}\n")
    monkeypatch.setattr(output_module, "PIPE_MAX_SIZE", pipe_max_size)
    output_module.output_pipe_size.cache_clear()
    try:
        first = output_module.output_pipe_size()
        pipe_max_size.write_text("1048576\n")
        assert output_module.output_pipe_size() == first == 128 * 1024
        write_fd, stream = open_output_pipe()
        os.close(write_fd)
        async with stream:
            assert fcntl.fcntl(stream.fileno(), fcntl.F_GETPIPE_SZ) == first
    finally:
        output_module.output_pipe_size.cache_clear()
