"""Checkpoint policy timing, on trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from grenadine_sv.lifecycle.policies import CoalescingTrigger, next_tick, run_interval


@pytest.mark.parametrize(
    ("previous", "interval", "now", "expected"),
    [
        (0.0, 10.0, 0.0, 10.0),
        (0.0, 10.0, 9.9, 10.0),
        (0.0, 10.0, 10.0, 20.0),
        (0.0, 10.0, 35.0, 40.0),
        (100.0, 60.0, 100.5, 160.0),
    ],
)
def test_next_tick_skips_missed_ticks(previous, interval, now, expected):
    assert next_tick(previous, interval, now) == expected


def test_next_tick_rejects_non_positive_interval():
    with pytest.raises(ValueError, match="positive"):
        next_tick(0.0, 0.0, 1.0)


async def test_interval_checkpoints_on_schedule(autojump_clock: trio.testing.MockClock):
    times: list[float] = []

    async def checkpoint() -> None:
        times.append(trio.current_time())

    start = trio.current_time()
    with trio.move_on_after(35.0):
        await run_interval("p", lambda: 10.0, lambda: True, checkpoint)
    assert [round(t - start, 6) for t in times] == [10.0, 20.0, 30.0]


async def test_slow_checkpoint_does_not_pile_up(autojump_clock: trio.testing.MockClock):
    times: list[float] = []

    async def slow_checkpoint() -> None:
        times.append(trio.current_time())
        await trio.sleep(25.0)

    start = trio.current_time()
    with trio.move_on_after(99.0):
        await run_interval("p", lambda: 10.0, lambda: True, slow_checkpoint)
    # Each 25 s run makes the ticks it spans (20, 30, ...) be skipped, not queued.
    assert [round(t - start, 6) for t in times] == [10.0, 40.0, 70.0]


async def test_interval_skips_while_not_running(autojump_clock: trio.testing.MockClock):
    running = {"value": False}
    times: list[float] = []

    async def checkpoint() -> None:
        times.append(trio.current_time())

    start = trio.current_time()

    async def become_running() -> None:
        await trio.sleep(25.0)
        running["value"] = True

    with trio.move_on_after(45.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(become_running)
            await run_interval("p", lambda: 10.0, lambda: running["value"], checkpoint)
    assert [round(t - start, 6) for t in times] == [30.0, 40.0]


async def test_signal_storm_is_coalesced(autojump_clock: trio.testing.MockClock):
    started: list[float] = []

    async def round_of_checkpoints() -> None:
        started.append(trio.current_time())
        await trio.sleep(5.0)

    trigger = CoalescingTrigger(round_of_checkpoints)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger.run)
        trigger.request()
        await trio.sleep(1.0)
        for _ in range(100):
            trigger.request()
        await trio.sleep(30.0)
        nursery.cancel_scope.cancel()
    assert trigger.requests == 101
    assert len(started) == 2
    assert started[1] - started[0] == pytest.approx(5.0)


async def test_the_trigger_is_idle_only_when_no_run_is_on_or_due(
    autojump_clock: trio.testing.MockClock,
):
    async def round_of_checkpoints() -> None:
        await trio.sleep(5.0)

    trigger = CoalescingTrigger(round_of_checkpoints)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger.run)
        assert trigger.idle
        trigger.request()
        assert not trigger.idle  # due
        await trio.sleep(1.0)
        assert not trigger.idle  # running
        trigger.request()
        await trio.sleep(5.0)
        assert not trigger.idle  # the merged second run
        await trio.sleep(5.0)
        assert trigger.idle
        nursery.cancel_scope.cancel()
