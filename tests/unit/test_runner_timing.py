"""The runner's timers (backoff, stop timeout) on trio's MockClock, with fake processes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox import SandboxError
from grenadine_sv.sandbox.spec import InvalidSandboxSpec
from grenadine_sv.supervisor.runner import (
    STARTED_WHILE_STOPPING,
    LaunchedInstance,
    ProgramRunner,
    RunnerContext,
)
from grenadine_sv.testing import FakeLauncher, FakeProcess


def program(tmp_path: Path, **fields: object) -> ProgramConfig:
    return ProgramConfig.model_validate(
        {"name": "p", "command": ["/bin/true"], "source": tmp_path / "x.toml", **fields}
    )


def runner_with(tmp_path: Path, config: ProgramConfig, make: object) -> ProgramRunner:
    launcher = FakeLauncher(make)  # type: ignore[arg-type]
    return ProgramRunner(
        config, RunnerContext(log_dir=tmp_path, root_anchor=tmp_path, state_dir=tmp_path), launcher
    )


def checkpointable_runner(tmp_path: Path) -> tuple[ProgramRunner, list[FakeProcess]]:
    """A runner (startsecs and stopwaitsecs 1) and the fake processes its launcher makes."""
    launcher = FakeLauncher()
    context = RunnerContext(log_dir=tmp_path, root_anchor=tmp_path, state_dir=tmp_path)
    runner = ProgramRunner(program(tmp_path, startsecs=1, stopwaitsecs=1), context, launcher)
    return runner, launcher.made


async def test_failed_starts_back_off_one_then_two_seconds_then_fatal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    def crash_at_once(pid: int) -> FakeProcess:
        process = FakeProcess(pid)
        process.exit(1)
        return process

    runner = runner_with(tmp_path, program(tmp_path, startretries=2), crash_at_once)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await runner.start(timeout=100)
        assert runner.state == State.FATAL
        starts = [t for t, s in runner.machine.history if s == State.STARTING]
        backoffs = [t for t, s in runner.machine.history if s == State.BACKOFF]
        assert [b - a for a, b in zip(backoffs, starts[1:], strict=True)] == pytest.approx(
            [1.0, 2.0]
        )
        nursery.cancel_scope.cancel()


async def test_stop_escalates_to_sigkill_after_stopwaitsecs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    made: list[FakeProcess] = []

    def stubborn(pid: int) -> FakeProcess:
        made.append(FakeProcess(pid, ignore=frozenset({signal.SIGTERM})))
        return made[-1]

    config = program(tmp_path, startsecs=1, stopwaitsecs=7)
    runner = runner_with(tmp_path, config, stubborn)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=10) == State.RUNNING
        began = trio.current_time()
        assert await runner.stop(timeout=30) == State.STOPPED
        [(term_at, term), (kill_at, kill)] = made[0].signals
        assert (term, kill) == (signal.SIGTERM, signal.SIGKILL)
        assert term_at == pytest.approx(began)
        assert kill_at - term_at == pytest.approx(7.0)
        assert runner.machine.last_exit == -signal.SIGKILL
        nursery.cancel_scope.cancel()


async def test_running_program_that_crashes_is_restarted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    launcher = FakeLauncher()
    made = launcher.made
    context = RunnerContext(log_dir=tmp_path, root_anchor=tmp_path, state_dir=tmp_path)
    runner = ProgramRunner(program(tmp_path, startsecs=1), context, launcher)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=10) == State.RUNNING
        made[0].exit(-11)
        await runner.wait_until(lambda s: s == State.RUNNING and len(made) == 2, 10)
        assert runner.machine.restart_count == 1
        assert runner.machine.pid == made[1].pid
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (InvalidSandboxSpec("sandbox spec for 'p': binds may not contain '/'"), False),
        (RuntimeError("a bug in a launcher"), False),
        (SandboxError("cannot restore: image corrupt", fatal=True), True),
    ],
)
async def test_a_launcher_that_raises_fails_only_this_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, error: Exception, fatal: bool
):
    """Regression: a spec the sandbox refused raised out of the runner and took the whole
    supervisor (and every program) down. Any launcher failure is a failed start."""
    attempts = 0

    async def broken(_: ProgramRunner) -> LaunchedInstance:
        nonlocal attempts
        attempts += 1
        raise error

    context = RunnerContext(log_dir=tmp_path, root_anchor=tmp_path, state_dir=tmp_path)
    runner = ProgramRunner(program(tmp_path, startretries=1), context, broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=100) == State.FATAL
        assert runner.machine.reason is not None
        assert str(error) in runner.machine.reason
        assert attempts == (1 if fatal else 2)
        nursery.cancel_scope.cancel()


async def test_a_start_with_its_own_launcher_uses_it_for_that_instance_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    """A restore starts one instance from an image; a later restart starts the usual way."""
    usual, restore, ignored = FakeLauncher(), FakeLauncher(first_pid=200), FakeLauncher()
    context = RunnerContext(log_dir=tmp_path, root_anchor=tmp_path, state_dir=tmp_path)
    runner = ProgramRunner(program(tmp_path, startsecs=1), context, usual)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(10, restore) == State.RUNNING
        # Asked while running: nothing starts, and the launcher is not kept for later.
        assert await runner.start(10, ignored) == State.RUNNING
        restore.made[0].exit(-9)
        await runner.wait_until(lambda s: s == State.RUNNING and len(usual.made) == 1, 10)
        assert (len(restore.made), len(usual.made), len(ignored.made)) == (1, 1, 0)
        nursery.cancel_scope.cancel()


async def test_a_stopping_checkpoint_holds_the_instance_without_a_signal_and_can_resume(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    runner, made = checkpointable_runner(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=10) == State.RUNNING
        assert runner.running_process() is made[0]
        instance = runner.stop_for_checkpoint()
        assert runner.state == State.STOPPING
        assert runner.running_process() is None
        await trio.sleep(5)  # far past stopwaitsecs: the checkpoint, not a timer, ends it
        assert made[0].signals == []
        runner.resume_instance(instance)
        assert runner.state == State.RUNNING
        assert runner.running_process() is made[0]
        nursery.cancel_scope.cancel()


async def test_a_stop_asked_during_a_failed_stopping_checkpoint_is_carried_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    runner, made = checkpointable_runner(tmp_path)
    stopped: list[State] = []

    async def stop() -> None:
        stopped.append(await runner.stop(timeout=30))

    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=10) == State.RUNNING
        instance = runner.stop_for_checkpoint()
        nursery.start_soon(stop)
        await trio.sleep(2)  # the checkpoint's dump, on the mock clock
        assert (made[0].signals, stopped) == ([], [])
        runner.resume_instance(instance)  # the dump failed
        await runner.wait_until(lambda s: s == State.STOPPED, 30)
        await trio.testing.wait_all_tasks_blocked()
        assert stopped == [State.STOPPED]
        assert [sig for _, sig in made[0].signals] == [signal.SIGTERM]
        nursery.cancel_scope.cancel()


async def test_a_start_asked_while_a_checkpoint_stops_the_program_says_why_it_did_not_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    runner, made = checkpointable_runner(tmp_path)
    started: list[State] = []

    async def start() -> None:
        started.append(await runner.start(timeout=30))

    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        assert await runner.start(timeout=10) == State.RUNNING
        runner.stop_for_checkpoint()
        nursery.start_soon(start)
        await trio.sleep(2)  # the checkpoint's dump, on the mock clock
        made[0].exit(-signal.SIGKILL)  # the image is listed: the frozen tree is ended
        await runner.wait_until(lambda s: s == State.STOPPED, 30)
        await trio.testing.wait_all_tasks_blocked()
        assert started == [State.STOPPED]
        assert len(made) == 1
        assert runner.machine.reason == STARTED_WHILE_STOPPING
        nursery.cancel_scope.cancel()
