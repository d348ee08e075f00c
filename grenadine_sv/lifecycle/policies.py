"""When checkpoints happen: on a signal (coalesced rounds) and on an interval (no pile-up)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import structlog
import trio

log = structlog.get_logger()


def next_tick(previous: float, interval: float, now: float) -> float:
    """The first tick of the `previous + k * interval` grid that is still ahead of `now`.

    A checkpoint that ran past one or more ticks skips them instead of running
    them back to back.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    candidate = previous + interval
    if candidate > now:
        return candidate
    missed = math.floor((now - candidate) / interval) + 1
    return candidate + missed * interval


class CoalescingTrigger:
    """Runs `action` when requested; requests that arrive while it runs are merged
    into at most one more run."""

    def __init__(self, action: Callable[[], Awaitable[None]]) -> None:
        self._action = action
        self._wakeup = trio.Event()
        self._running = False
        self.requests = 0

    @property
    def idle(self) -> bool:
        """No run in progress and none to come (until the next request)."""
        return not self._running and not self._wakeup.is_set()

    def request(self) -> None:
        self.requests += 1
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._running = True
            try:
                await self._action()
            finally:
                self._running = False


async def run_interval(
    name: str,
    interval: Callable[[], float | None],
    is_running: Callable[[], bool],
    checkpoint: Callable[[], Awaitable[None]],
) -> None:
    """Checkpoint every `interval()` seconds while the program is RUNNING.

    `interval` is read at each tick, so a reload that changes it takes effect
    without restarting the task; None pauses the policy.
    """
    tick = trio.current_time()
    while True:
        seconds = interval()
        if seconds is None:
            return
        tick = next_tick(tick, seconds, trio.current_time())
        await trio.sleep_until(tick)
        if not is_running():
            log.info("interval_checkpoint_skipped", program=name, reason="not running")
            continue
        await checkpoint()
