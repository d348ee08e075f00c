"""The state file (state_dir/supervisor.json): what it holds, how it is read back, and that
its writes, done in worker threads, stay one at a time and end on the last state."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor import recovery
from grenadine_sv.supervisor.recovery import (
    RecordedInstance,
    Recovery,
    read_state,
    state_path,
    write_state,
)
from grenadine_sv.supervisor.runner import ProgramRunner

ONE = RecordedInstance(pid=10, start_time=111, pid_ns_inode=4026531836, definition_digest="ab")


def test_what_is_written_is_read_back(tmp_path: Path) -> None:
    write_state(tmp_path, {"web": ONE})
    assert read_state(tmp_path) == {"web": ONE}
    assert state_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_no_file_means_no_instances(tmp_path: Path) -> None:
    assert read_state(tmp_path) == {}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"programs": {"web": {"pid": "x"}}}',
        '{"programs": {"web": {"pid": 1}}}',
        '{"programs": 3}',
    ],
)
def test_an_unreadable_file_means_no_instances(tmp_path: Path, text: str) -> None:
    state_path(tmp_path).write_text(text)
    assert read_state(tmp_path) == {}


@dataclass
class FakeProcess:
    pid: int
    start_time: int = 1
    pid_ns_inode: int = 2
    returncode: int | None = None


@dataclass
class FakeMachine:
    pid: int | None


@dataclass
class FakeConfig:
    def definition_digest(self) -> str:
        return "digest"


@dataclass
class FakeRunner:
    name: str
    process: FakeProcess | None
    machine: FakeMachine = field(init=False)
    config: FakeConfig = field(default_factory=FakeConfig)

    def __post_init__(self) -> None:
        self.machine = FakeMachine(self.process.pid if self.process else None)


async def test_writes_are_one_at_a_time_and_end_on_the_last_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing = threading.Lock()
    overlaps: list[int] = []
    written: list[dict[str, Any]] = []

    def slow_write(state_dir: Path, instances: Any) -> None:
        if not writing.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            time.sleep(0.01)  # a slow disk: changes pile up meanwhile
            write_state(state_dir, instances)
            written.append(json.loads(state_path(state_dir).read_text())["programs"])
        finally:
            writing.release()

    monkeypatch.setattr(recovery, "write_state", slow_write)
    keeper = Recovery(tmp_path, None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.keep_state_file)
        for pid in range(100, 150):
            runner = FakeRunner(f"p{pid % 5}", FakeProcess(pid))
            keeper.record_instances(cast(ProgramRunner, runner), State.STARTING, State.RUNNING)
            await trio.sleep(0)
        gone = FakeRunner("p0", None)
        keeper.record_instances(cast(ProgramRunner, gone), State.RUNNING, State.EXITED)
        with trio.fail_after(10):
            while not written or set(written[-1]) != {"p1", "p2", "p3", "p4"}:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert overlaps == []
    assert {name: entry["pid"] for name, entry in written[-1].items()} == {
        "p1": 146,
        "p2": 147,
        "p3": 148,
        "p4": 149,
    }
    # Coalesced: far fewer writes than changes, never an older state after a newer one.
    assert len(written) < 51
    pids = [entry["pid"] for state in written for name, entry in state.items() if name == "p4"]
    assert pids == sorted(pids)
