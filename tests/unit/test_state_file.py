"""The state file (state_dir/supervisor.json): what it holds, how it is read back, and that
its writes, done in worker threads, stay one at a time and end on the last state."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from grenadine_sv.config.loading import Config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor import recovery
from grenadine_sv.supervisor.checkpoints import CheckpointService
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


FROZEN = RecordedInstance(pid=20, start_time=222, pid_ns_inode=4026531836, definition_digest="ab")


@pytest.fixture
def frozen_orphan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A predecessor left p0 frozen, and its image (a take-back's, trigger recovery) listed."""
    image = SimpleNamespace(id="904aa1", trigger="recovery")

    async def orphans(state_dir: Path, cgroups: object) -> dict[str, RecordedInstance]:
        return {"p0": FROZEN}

    monkeypatch.setattr(recovery, "find_orphans", orphans)
    monkeypatch.setattr(Recovery, "_image_that_froze", lambda self, name, instance: image)
    monkeypatch.setattr(recovery, "is_same_process", lambda instance: False)


def recovery_in(tmp_path: Path) -> Recovery:
    return Recovery(tmp_path, cast(CheckpointService, SimpleNamespace(launch_with_fallback=print)))


async def taken_back(tmp_path: Path, keeper: Recovery | None = None) -> Recovery:
    keeper = keeper or recovery_in(tmp_path)
    config = cast(Config, SimpleNamespace(programs={"p0": SimpleNamespace()}))
    assert set(await keeper.take_back_orphans(config)) == {"p0"}
    return keeper


@pytest.mark.usefixtures("frozen_orphan")
async def test_an_orphan_ended_for_its_restore_stays_in_the_state_file_until_it_is_back(
    tmp_path: Path,
) -> None:
    """A supervisor killed after ending a frozen orphan and before restoring it left a state
    file without it, and the next one cold-started the program: its memory lost (chaos
    harness, seeds 4 and 1). The orphan is written before it is ended (it may have been
    found only in its cgroup) and stays until its restore is over."""
    keeper = await taken_back(tmp_path)
    assert read_state(tmp_path) == {"p0": FROZEN}
    other = FakeRunner("p1", FakeProcess(30))
    keeper.record_instances(cast(ProgramRunner, other), State.STARTING, State.RUNNING)
    starting = FakeRunner("p0", None)
    keeper.record_instances(cast(ProgramRunner, starting), State.STOPPED, State.STARTING)
    await keeper.write_now()
    assert read_state(tmp_path)["p0"] == FROZEN
    restored = FakeRunner("p0", FakeProcess(40))
    keeper.record_instances(cast(ProgramRunner, restored), State.STARTING, State.RUNNING)
    await keeper.write_now()
    assert read_state(tmp_path)["p0"].pid == 40


@pytest.mark.usefixtures("frozen_orphan")
async def test_the_state_file_follows_the_programs_after_a_take_back(tmp_path: Path) -> None:
    """The take-back's own writes left the writer waiting on an event nothing set again: the
    file stayed at the take-back's snapshot, and after the next kill that supervisor restored
    p0 from the take-back's image though it had been checkpointed and stopped since (chaos
    harness seed 4, CI)."""
    keeper = recovery_in(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.keep_state_file)
        await trio.sleep(0)
        await taken_back(tmp_path, keeper)
        restored = FakeRunner("p0", FakeProcess(40))
        keeper.record_instances(cast(ProgramRunner, restored), State.STARTING, State.RUNNING)
        with trio.fail_after(10):
            while read_state(tmp_path).get("p0", FROZEN).pid != 40:
                await trio.sleep(0.01)
        stopped = FakeRunner("p0", None)
        keeper.record_instances(cast(ProgramRunner, stopped), State.STOPPING, State.STOPPED)
        with trio.fail_after(10):
            while "p0" in read_state(tmp_path):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("frozen_orphan")
async def test_an_orphan_whose_restore_failed_leaves_the_state_file(tmp_path: Path) -> None:
    keeper = await taken_back(tmp_path)
    failed = FakeRunner("p0", None)
    keeper.record_instances(cast(ProgramRunner, failed), State.STARTING, State.FATAL)
    await keeper.write_now()
    assert "p0" not in read_state(tmp_path)
