"""Sandbox preparation of many programs at once shares a few worker threads (no real cgroups:
a stand-in records how many of its `ensure` calls run at the same time)."""

from __future__ import annotations

import threading
from pathlib import Path

import trio
import trio.testing

from grenadine_sv.supervisor.instance import PREPARATION_THREADS, preparation_limiter
from grenadine_sv.supervisor.membership import claim

PROGRAMS = 3 * PREPARATION_THREADS
WAIT_SECONDS = 10.0


class HeldCgroup:
    """A cgroup whose `ensure` blocks until released, counting the calls under way."""

    path = Path("/sys/fs/cgroup/none")

    def __init__(self, counter: ConcurrentCalls) -> None:
        self.counter = counter

    def ensure(self) -> None:
        self.counter.enter()
        try:
            self.counter.release.wait(WAIT_SECONDS)
        finally:
            self.counter.leave()

    def pids(self) -> list[int]:
        return []

    def set_definition(self, digest: str) -> None:
        pass


class ConcurrentCalls:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.release = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


async def test_many_claims_at_once_run_on_the_shared_preparation_threads() -> None:
    counter = ConcurrentCalls()
    limiter = preparation_limiter()
    async with trio.open_nursery() as nursery:
        for n in range(PROGRAMS):
            nursery.start_soon(claim, HeldCgroup(counter), "digest", f"p{n}", limiter)
        try:
            with trio.fail_after(WAIT_SECONDS):
                while counter.now < PREPARATION_THREADS:
                    await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            assert counter.now == PREPARATION_THREADS
        finally:
            counter.release.set()
    assert counter.peak == PREPARATION_THREADS
