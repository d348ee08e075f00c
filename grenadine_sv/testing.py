"""Fakes for tests, in the spirit of structlog.testing: stand-ins for what a unit test cannot
run (a sandboxed process, a launcher) or need not touch (the image store on disk).

Nothing in the supervisor imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import trio
import trio.testing

from grenadine_sv.sandbox import SandboxProcess
from grenadine_sv.supervisor.runner import LaunchedInstance, ProgramRunner


class FakeProcess:
    """Stands in for a sandboxed process: exits when told, or on a signal it does not ignore.
    Every signal sent is kept with the (trio) time it was sent at."""

    def __init__(self, pid: int, *, ignore: frozenset[int] = frozenset()) -> None:
        self.pid = pid
        self.start_time = 0
        self.pid_ns_inode = 0
        self.under_init = False
        self.returncode: int | None = None
        self.signals: list[tuple[float, int]] = []
        self._ignore = ignore
        self._exited = trio.Event()

    def exit(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append((trio.current_time(), sig))
        if sig not in self._ignore:
            self.exit(-sig)

    def close(self) -> None:
        pass


def closed_stream() -> trio.abc.ReceiveStream:
    """An output stream that is at its end at once."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    send.close()
    return receive


@dataclass
class FakeLauncher:
    """A launcher whose instances are FakeProcesses made by `make(pid)`; pids count up from
    `first_pid`, and every process made is kept in `made`."""

    make: Callable[[int], FakeProcess] = FakeProcess
    first_pid: int = 100
    made: list[FakeProcess] = field(default_factory=list)

    async def __call__(self, runner: ProgramRunner) -> LaunchedInstance:
        process = self.make(self.first_pid + len(self.made))
        self.made.append(process)
        return LaunchedInstance(cast(SandboxProcess, process), closed_stream(), closed_stream())


@dataclass(frozen=True)
class MemoryImage:
    id: str
    program: str
    created: datetime
    memory_bytes: int
    image_bytes: int


T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class MemoryImageStore:
    """The part of the image store the metrics read (metrics.collector.ImageStoreLike), in
    memory: images added and removed by the test, listed newest first."""

    def __init__(self, free_bytes: int = 10 * 1024**3) -> None:
        self.images: dict[str, list[MemoryImage]] = {}
        self.free = free_bytes

    def add(
        self, program: str, *, memory_bytes: int, image_bytes: int, minutes: int = 0
    ) -> MemoryImage:
        """An image of `program` taken `minutes` after a fixed time."""
        number = sum(len(images) for images in self.images.values()) + 1
        image = MemoryImage(
            id=f"{number:032x}",
            program=program,
            created=T0 + timedelta(minutes=minutes),
            memory_bytes=memory_bytes,
            image_bytes=image_bytes,
        )
        self.images.setdefault(program, []).append(image)
        return image

    def remove(self, image: MemoryImage) -> None:
        self.images[image.program].remove(image)

    def programs(self) -> Sequence[str]:
        return sorted(name for name, images in self.images.items() if images)

    def list(self, program: str) -> Sequence[MemoryImage]:
        return sorted(self.images.get(program, []), key=lambda i: i.created, reverse=True)

    def usage(self, program: str) -> tuple[int, int]:
        images = self.images.get(program, [])
        return len(images), sum(image.image_bytes for image in images)

    def free_bytes(self) -> int:
        return self.free
