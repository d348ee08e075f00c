"""What a program's runner is given (`RunnerContext`: where logs and sandboxes go, the stdio
keeper, the cgroups) and what a launcher hands it: an instance (`LaunchedInstance`: its
process, its output, what runs beside it), and for one restored from an image, which image
(`RestoredFrom`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
import trio

from grenadine_sv.keeper.client import KeeperError, StdioKeeper
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox import LauncherServer, SandboxProcess
from grenadine_sv.sandbox.cgroup import ProgramCgroups

# Worker threads that prepare sandboxes (a cgroup made, a private /tmp emptied): a few ms of
# file system work per program. Fewer threads than trio's default of 40: when many programs
# start at once, creating a thread for each costs more than the work it does.
PREPARATION_THREADS = 4


def preparation_limiter() -> trio.CapacityLimiter:
    return trio.CapacityLimiter(PREPARATION_THREADS)


@dataclass(frozen=True)
class RunnerContext:
    """What every runner shares: directories, observers and the supervisor's helpers."""

    log_dir: Path
    root_anchor: Path
    # Where programs' private /tmp directories live (state_dir/tmp).
    state_dir: Path
    # Told (runner, state before, state after) at each change of state (runner.StateObserver).
    observers: tuple[Callable[[Any, State, State], None], ...] = ()
    sandbox_server: LauncherServer | None = None
    # Holds each output pipe's read end too, so programs outlive a killed supervisor.
    keeper: StdioKeeper | None = None
    # A cgroup per program, so that its processes are known whatever was recorded.
    cgroups: ProgramCgroups | None = None
    # Shared by every runner of a supervisor (see PREPARATION_THREADS).
    preparation_threads: trio.CapacityLimiter = field(default_factory=preparation_limiter)

    def keep_pipe(self, program: str, stream: str, read_fd: int) -> str | None:
        """Hand a copy of an output pipe's read end to the stdio keeper; its key, or None."""
        kept = self.keep_pipes(program, ((stream, read_fd),))
        return kept[0] if kept else None

    def keep_pipes(self, program: str, pipes: Sequence[tuple[str, int]]) -> tuple[str, ...]:
        """`keep_pipe` for each (stream, read_fd) in one request: the keys of all, or none
        (the keeper's failure is logged)."""
        if self.keeper is None:
            return ()
        try:
            return self.keeper.keep_all(program, pipes)
        except KeeperError as exc:
            structlog.get_logger().error("stdio_keeper_failed", program=program, error=str(exc))
            return ()

    def release_pipes(self, keys: tuple[str, ...]) -> None:
        if self.keeper is None:
            return
        for key in keys:
            try:
                self.keeper.drop(key)
            except KeeperError as exc:
                structlog.get_logger().error("stdio_keeper_failed", key=key, error=str(exc))


@dataclass
class LaunchedInstance:
    """A started instance: its process, its output streams and what runs beside it."""

    process: SandboxProcess
    stdout: trio.abc.ReceiveStream
    stderr: trio.abc.ReceiveStream
    # Keys of the pipes the stdio keeper holds for this instance (released at end of file).
    held: tuple[str, ...] = ()
    companions: list[Callable[[SandboxProcess], Awaitable[None]]] = field(default_factory=list)
    """Tasks that run next to the instance (a lazy restore's memory supervision)."""


@dataclass(frozen=True)
class RestoredFrom:
    """The image the current instance was restored from, and on what occasion."""

    image_id: str
    created: datetime
    occasion: str
    # Set when this image was restored instead of the one asked for (restore_fallback).
    instead_of: str | None = None
