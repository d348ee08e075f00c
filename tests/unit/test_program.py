"""The pure lifecycle state machine: events in, actions out."""

from __future__ import annotations

import pytest

from grenadine_sv.lifecycle.machine import (
    BackoffElapsed,
    BecameReady,
    Exited,
    Kill,
    LifecyclePolicy,
    ProgramMachine,
    ReadyFailed,
    ScheduleKill,
    ScheduleRetry,
    SendStopSignal,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRefused,
    StartRequested,
    State,
    StopAborted,
    StopRequested,
    StopTimeout,
    WatchReadiness,
    backoff_delay,
)


def running_machine(**policy: object) -> ProgramMachine:
    machine = ProgramMachine(LifecyclePolicy(**policy))  # type: ignore[arg-type]
    machine.handle(StartRequested(0.0))
    machine.handle(Spawned(machine.instance, 100, 0.1))
    machine.handle(BecameReady(machine.instance, 1.1))
    assert machine.state == State.RUNNING
    return machine


def test_start_spawns_then_watches_readiness_then_runs():
    machine = ProgramMachine(LifecyclePolicy(startsecs=2.0))
    assert machine.handle(StartRequested(0.0)) == [Spawn(1)]
    assert machine.state == State.STARTING
    actions = machine.handle(Spawned(1, 4242, 0.1))
    assert actions == [WatchReadiness(1, startsecs=2.0, use_probe=False)]
    assert machine.pid == 4242
    machine.handle(BecameReady(1, 2.1))
    assert machine.state == State.RUNNING
    assert machine.started_at == 0.1


def test_exit_during_start_backs_off_with_growing_delay_then_fatal():
    machine = ProgramMachine(LifecyclePolicy(startretries=2))
    machine.handle(StartRequested(0.0))
    delays = []
    for attempt in (1, 2):
        machine.handle(Spawned(machine.instance, 10, 0.0))
        actions = machine.handle(Exited(machine.instance, 1, 0.5))
        assert machine.state == State.BACKOFF
        assert actions == [ScheduleRetry(attempt, backoff_delay(attempt))]
        delays.append(backoff_delay(attempt))
        assert machine.handle(BackoffElapsed(attempt, 5.0)) == [Spawn(machine.instance)]
    machine.handle(Spawned(machine.instance, 10, 0.0))
    assert machine.handle(Exited(machine.instance, 1, 0.5)) == []
    assert machine.state == State.FATAL
    assert "code 1" in machine.reason
    assert delays == sorted(delays)
    assert delays[0] < delays[1]


def test_backoff_is_capped():
    assert backoff_delay(1) == 1.0
    assert backoff_delay(3) == 4.0
    assert backoff_delay(50) == 60.0


def test_spawn_failure_counts_as_a_failed_start():
    machine = ProgramMachine(LifecyclePolicy(startretries=0))
    machine.handle(StartRequested(0.0))
    machine.handle(SpawnFailed(1, "no such command: /nope", 0.0))
    assert machine.state == State.FATAL
    assert machine.reason == "no such command: /nope"


@pytest.mark.parametrize(
    ("autorestart", "returncode", "restarts"),
    [
        ("always", 0, True),
        ("always", 3, True),
        ("on-failure", 0, False),
        ("on-failure", 3, True),
        ("on-failure", -9, True),
        ("never", 3, False),
    ],
)
def test_autorestart_after_running(autorestart, returncode, restarts):
    machine = running_machine(autorestart=autorestart)
    exited = machine.instance
    actions = machine.handle(Exited(exited, returncode, 10.0))
    if restarts:
        assert actions == [Spawn(exited + 1)]
        assert machine.state == State.STARTING
        assert machine.restart_count == 1
    else:
        assert actions == []
        assert machine.state == State.EXITED


def test_exitcodes_decide_what_counts_as_expected():
    machine = running_machine(autorestart="on-failure", exitcodes=frozenset({0, 2}))
    assert machine.handle(Exited(machine.instance, 2, 10.0)) == []
    assert machine.state == State.EXITED
    assert machine.reason == ""


def test_stop_signals_then_kills_after_stopwaitsecs():
    machine = running_machine(stopwaitsecs=7.0)
    instance = machine.instance
    assert machine.handle(StopRequested(5.0)) == [
        SendStopSignal(instance),
        ScheduleKill(instance, 7.0),
    ]
    assert machine.state == State.STOPPING
    assert machine.handle(StopTimeout(instance, 12.0)) == [Kill(instance)]
    machine.handle(Exited(instance, -9, 12.1))
    assert machine.state == State.STOPPED


def test_stop_timeout_after_exit_does_nothing():
    machine = running_machine()
    instance = machine.instance
    machine.handle(StopRequested(5.0))
    machine.handle(Exited(instance, 0, 5.5))
    assert machine.handle(StopTimeout(instance, 15.0)) == []


def test_stop_during_backoff_cancels_the_retry():
    machine = ProgramMachine(LifecyclePolicy())
    machine.handle(StartRequested(0.0))
    machine.handle(Exited(1, 1, 0.1))
    assert machine.state == State.BACKOFF
    machine.handle(StopRequested(0.2))
    assert machine.state == State.STOPPED
    assert machine.handle(BackoffElapsed(1, 1.2)) == []


def test_stop_while_spawning_signals_once_the_pid_is_known():
    machine = ProgramMachine(LifecyclePolicy(stopwaitsecs=3.0))
    machine.handle(StartRequested(0.0))
    assert machine.handle(StopRequested(0.01)) == []
    assert machine.state == State.STOPPING
    assert machine.handle(Spawned(1, 77, 0.05)) == [SendStopSignal(1), ScheduleKill(1, 3.0)]
    machine.handle(Exited(1, -15, 0.1))
    assert machine.state == State.STOPPED


def test_stop_by_checkpoint_sends_no_signal():
    machine = running_machine()
    assert machine.handle(StopRequested(3.0, by_checkpoint=True)) == []
    machine.handle(Exited(machine.instance, -9, 3.2))
    assert machine.state == State.STOPPED


def test_ready_probe_failure_stops_the_instance_and_counts_as_failed_start():
    machine = ProgramMachine(LifecyclePolicy(has_ready_probe=True, startretries=0))
    machine.handle(StartRequested(0.0))
    machine.handle(Spawned(1, 50, 0.0))
    actions = machine.handle(ReadyFailed(1, "tcp 127.0.0.1:1: refused", 10.0))
    assert actions == [SendStopSignal(1), ScheduleKill(1, 10.0)]
    machine.handle(Exited(1, -15, 10.1))
    assert machine.state == State.FATAL
    assert "refused" in machine.reason


def test_events_from_an_old_instance_are_ignored():
    machine = running_machine(autorestart="always")
    old = machine.instance
    machine.handle(Exited(old, 1, 10.0))
    assert machine.state == State.STARTING
    assert machine.handle(BecameReady(old, 10.5)) == []
    assert machine.handle(Exited(old, 1, 10.6)) == []
    assert machine.state == State.STARTING


def test_start_after_fatal_resets_the_failure_count():
    machine = ProgramMachine(LifecyclePolicy(startretries=0))
    machine.handle(StartRequested(0.0))
    machine.handle(Exited(1, 1, 0.1))
    assert machine.state == State.FATAL
    assert machine.handle(StartRequested(1.0)) == [Spawn(2)]
    assert machine.failures == 0


def test_start_while_running_does_nothing():
    machine = running_machine()
    assert machine.handle(StartRequested(2.0)) == []
    assert machine.state == State.RUNNING


def test_fatal_spawn_failure_skips_retries():
    machine = ProgramMachine(LifecyclePolicy(startretries=5))
    machine.handle(StartRequested(0.0))
    assert machine.handle(SpawnFailed(1, "image abc is corrupt", 0.1, fatal=True)) == []
    assert machine.state == State.FATAL
    assert machine.reason == "image abc is corrupt"


def test_failed_stopping_checkpoint_returns_to_running():
    machine = running_machine()
    machine.handle(StopRequested(2.0, by_checkpoint=True))
    assert machine.state == State.STOPPING
    machine.handle(StopAborted(machine.instance, 2.5))
    assert machine.state == State.RUNNING


def test_a_stop_asked_during_a_stopping_checkpoint_is_carried_out_when_the_checkpoint_fails():
    machine = running_machine(stopwaitsecs=4.0)
    machine.handle(StopRequested(2.0, by_checkpoint=True))
    assert machine.handle(StopRequested(2.1)) == []  # the frozen instance is not signalled
    assert machine.state == State.STOPPING
    actions = machine.handle(StopAborted(machine.instance, 2.5))
    assert actions == [SendStopSignal(machine.instance), ScheduleKill(machine.instance, 4.0)]
    assert machine.state == State.STOPPING
    machine.handle(Exited(machine.instance, -15, 2.6))
    assert machine.state == State.STOPPED
    assert machine.last_exit_requested


def test_a_stop_asked_during_a_stopping_checkpoint_that_succeeds_ends_stopped():
    machine = running_machine()
    machine.handle(StopRequested(2.0, by_checkpoint=True))
    machine.handle(StopRequested(2.1))
    assert machine.handle(Exited(machine.instance, -9, 2.5)) == []
    assert machine.state == State.STOPPED


def test_a_stop_carried_out_after_a_failed_checkpoint_is_not_carried_over_to_the_next():
    machine = running_machine()
    machine.handle(StopRequested(2.0, by_checkpoint=True))
    machine.handle(StopRequested(2.1))
    machine.handle(StopAborted(machine.instance, 2.5))
    machine.handle(Exited(machine.instance, -15, 2.6))
    machine.handle(StartRequested(3.0))
    machine.handle(Spawned(machine.instance, 200, 3.1))
    machine.handle(BecameReady(machine.instance, 4.1))
    machine.handle(StopRequested(5.0, by_checkpoint=True))
    assert machine.handle(StopAborted(machine.instance, 5.5)) == []
    assert machine.state == State.RUNNING


def test_a_refused_start_leaves_the_state_and_gives_the_reason():
    machine = ProgramMachine(LifecyclePolicy())
    assert machine.handle(StartRefused("dependency db is FATAL", 1.0)) == []
    assert machine.state == State.STOPPED
    assert machine.reason == "dependency db is FATAL"


def test_a_refused_start_does_not_touch_an_active_program():
    machine = running_machine()
    assert machine.handle(StartRefused("dependency db is FATAL", 2.0)) == []
    assert machine.state == State.RUNNING
    assert machine.reason == ""


def test_exit_soon_after_ready_backs_off_then_gives_up():
    machine = ProgramMachine(LifecyclePolicy(startsecs=1.0, startretries=2, autorestart="always"))
    machine.handle(StartRequested(0.0))
    now = 0.0
    for attempt in (1, 2):
        machine.handle(Spawned(machine.instance, 10, now))
        machine.handle(BecameReady(machine.instance, now + 0.1))
        assert machine.state == State.RUNNING
        actions = machine.handle(Exited(machine.instance, 1, now + 0.3))
        assert machine.state == State.BACKOFF
        assert actions == [ScheduleRetry(attempt, backoff_delay(attempt))]
        assert "0.2s after it became ready" in machine.reason
        now += 10.0
        assert machine.handle(BackoffElapsed(attempt, now)) == [Spawn(machine.instance)]
    machine.handle(Spawned(machine.instance, 10, now))
    machine.handle(BecameReady(machine.instance, now + 0.1))
    assert machine.handle(Exited(machine.instance, 1, now + 0.3)) == []
    assert machine.state == State.FATAL


def test_an_instance_that_stayed_up_restarts_at_once_and_is_forgiven_earlier_failures():
    machine = ProgramMachine(LifecyclePolicy(startsecs=1.0, startretries=3, autorestart="always"))
    machine.handle(StartRequested(0.0))
    machine.handle(Spawned(machine.instance, 10, 0.0))
    machine.handle(Exited(machine.instance, 1, 0.5))  # a failed start
    machine.handle(BackoffElapsed(1, 2.0))
    machine.handle(Spawned(machine.instance, 11, 2.0))
    machine.handle(BecameReady(machine.instance, 3.0))
    assert machine.failures == 1
    assert machine.handle(Exited(machine.instance, 1, 60.0)) == [Spawn(machine.instance)]
    assert machine.state == State.STARTING
    assert machine.failures == 0
