"""Checkpoint a running program into the image store, and start a program from an image."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
import trio

from grenadine_sv.config import ProgramConfig
from grenadine_sv.criu import Criu, CriuError, DumpRequest, RestoreRequest, pipe_key
from grenadine_sv.image_facts import ImageFactsError, read_dump_facts
from grenadine_sv.images import ImageCorrupt, ImageMeta, ImageStore, Trigger
from grenadine_sv.output import open_output_pipe
from grenadine_sv.program import StopAborted, StopRequested
from grenadine_sv.runner import LaunchedInstance, ProgramRunner, launch_cold
from grenadine_sv.sandbox import SandboxError, SandboxProcess

log = structlog.get_logger()

MICROSECONDS = 1_000_000


class CheckpointError(Exception):
    """A checkpoint did not happen; the program is as it was and no image was kept."""


class RestoreError(SandboxError):
    """A restore did not happen; the message says why."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class CheckpointMetrics(Protocol):
    def checkpoint_succeeded(
        self, program: str, trigger: str, duration_seconds: float, frozen_seconds: float
    ) -> None: ...

    def checkpoint_failed(self, program: str, trigger: str) -> None: ...

    def restore_succeeded(self, program: str, duration_seconds: float) -> None: ...

    def restore_failed(self, program: str) -> None: ...


class NoMetrics:
    def checkpoint_succeeded(
        self, program: str, trigger: str, duration_seconds: float, frozen_seconds: float
    ) -> None:
        pass

    def checkpoint_failed(self, program: str, trigger: str) -> None:
        pass

    def restore_succeeded(self, program: str, duration_seconds: float) -> None:
        pass

    def restore_failed(self, program: str) -> None:
        pass


@dataclass
class ProgramImages:
    """What the checkpoint layer keeps per program across its instances."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    last_checkpoint: ImageMeta | None = None


class CheckpointService:
    def __init__(
        self,
        store: ImageStore,
        criu: Criu,
        criu_version: str,
        work_dir: Path,
        metrics: CheckpointMetrics | None = None,
    ) -> None:
        self.store = store
        self.criu = criu
        self.criu_version = criu_version
        self.work_dir = work_dir
        self.metrics: CheckpointMetrics = metrics or NoMetrics()
        self._programs: dict[str, ProgramImages] = {}
        self.clock: Callable[[], float] = time.monotonic

    def images_of(self, program: str) -> ProgramImages:
        return self._programs.setdefault(program, ProgramImages())

    def last_checkpoint(self, program: str) -> ImageMeta | None:
        known = self.images_of(program).last_checkpoint
        if known is not None:
            return known
        listed = self.store.list(program)
        return listed[0] if listed else None

    # checkpoint ----------------------------------------------------------------

    async def checkpoint(
        self, runner: ProgramRunner, trigger: Trigger, *, stop: bool = False
    ) -> ImageMeta:
        program = runner.name
        async with self.images_of(program).lock:
            pid = runner.machine.pid
            if runner.state.value != "RUNNING" or pid is None:
                raise CheckpointError(f"{program} is {runner.state.value}, not RUNNING")
            policy = runner.config.checkpoint
            leave_running = policy.leave_running and not stop
            instance = runner.machine.instance
            bound = log.bind(program=program, pid=pid, trigger=trigger)
            if not leave_running:
                runner.handle_now(StopRequested(trio.current_time(), by_checkpoint=True))
            began = self.clock()
            try:
                image = await trio.to_thread.run_sync(
                    self._dump,
                    runner.config,
                    pid,
                    trigger,
                    leave_running,
                    policy.tcp_established,
                    abandon_on_cancel=False,
                )
            except (CriuError, ImageFactsError, OSError, ValueError) as exc:
                if not leave_running:
                    runner.handle_now(StopAborted(instance, trio.current_time()))
                self.metrics.checkpoint_failed(program, trigger)
                bound.error("checkpoint_failed", error=str(exc))
                raise CheckpointError(str(exc)) from exc
            duration = self.clock() - began
            frozen = image.dump_stats.get("frozen_time", 0) / MICROSECONDS
            self.metrics.checkpoint_succeeded(program, trigger, duration, frozen)
            self.images_of(program).last_checkpoint = image
            bound.info(
                "checkpoint_done",
                image_id=image.id,
                duration_seconds=round(duration, 3),
                frozen_seconds=frozen,
                image_bytes=image.image_bytes,
            )
            deleted = await trio.to_thread.run_sync(self.store.prune, program, policy.keep)
            for old in deleted:
                bound.info("image_pruned", image_id=old.id)
            return image

    def _dump(
        self,
        config: ProgramConfig,
        pid: int,
        trigger: Trigger,
        leave_running: bool,
        tcp_established: bool,
    ) -> ImageMeta:
        with self.store.begin(config.name) as pending:
            self.criu.dump(
                DumpRequest(
                    pid=pid,
                    images_dir=pending.criu_dir,
                    leave_running=leave_running,
                    tcp_established=tcp_established,
                )
            )
            return pending.commit(
                read_dump_facts(pending.criu_dir),
                trigger=trigger,
                criu_version=self.criu_version,
                definition_digest=config.definition_digest(),
                leave_running=leave_running,
            )

    async def recover_orphan(self, config: ProgramConfig, pid: int) -> ImageMeta:
        """Checkpoint a sandbox left running by a previous supervisor, ending it, so that it
        can be restored as a child of this one."""
        async with self.images_of(config.name).lock:
            try:
                image = await trio.to_thread.run_sync(
                    self._dump,
                    config,
                    pid,
                    "recovery",
                    False,
                    config.checkpoint.tcp_established,
                    abandon_on_cancel=False,
                )
            except (CriuError, ImageFactsError, OSError, ValueError) as exc:
                self.metrics.checkpoint_failed(config.name, "recovery")
                raise CheckpointError(str(exc)) from exc
            self.images_of(config.name).last_checkpoint = image
            return image

    # restore -------------------------------------------------------------------

    def resolve(self, program: str, ref: str) -> ImageMeta:
        return self.store.resolve(program, ref)

    async def launch_from_image(self, runner: ProgramRunner, image: ImageMeta) -> LaunchedInstance:
        """Restore `image` as the program's new instance (a child of this process)."""
        program = runner.name
        async with self.images_of(program).lock:
            began = self.clock()
            try:
                launched = await trio.to_thread.run_sync(
                    self._restore, runner, image, abandon_on_cancel=False
                )
            except (CriuError, ImageCorrupt, OSError) as exc:
                self.metrics.restore_failed(program)
                log.error("restore_failed", program=program, image_id=image.id, error=str(exc))
                raise RestoreError(f"restore of {program} from {image.id} failed: {exc}") from exc
            duration = self.clock() - began
            self.metrics.restore_succeeded(program, duration)
            log.info(
                "restore_done",
                program=program,
                image_id=image.id,
                pid=launched.process.pid,
                duration_seconds=round(duration, 3),
            )
            return launched

    def _restore(self, runner: ProgramRunner, image: ImageMeta) -> LaunchedInstance:
        self.store.verify(image)
        work_dir = self.work_dir / runner.name
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_fds: dict[int, int] = {}
        streams: dict[int, trio.lowlevel.FdStream] = {}
        try:
            for inode in dict.fromkeys(image.stdio_pipes.values()):
                write_fd, stream = open_output_pipe()
                os.set_inheritable(write_fd, True)
                write_fds[inode] = write_fd
                streams[inode] = stream
            pid = self.criu.restore(
                RestoreRequest(
                    images_dir=self.store.criu_dir(image),
                    work_dir=work_dir,
                    inherit_fds={pipe_key(inode): fd for inode, fd in write_fds.items()},
                    tcp_established=runner.config.checkpoint.tcp_established,
                    log_name=f"restore-{image.id}.log",
                )
            )
        except BaseException:
            for stream in streams.values():
                stream.close()
            raise
        finally:
            for fd in write_fds.values():
                os.close(fd)
        process = SandboxProcess.adopt(pid)
        stdout = streams.get(image.stdio_pipes.get("stdout", -1))
        stderr = streams.get(image.stdio_pipes.get("stderr", -1))
        return LaunchedInstance(process, stdout or _empty_stream(), stderr or _empty_stream())

    # launchers -----------------------------------------------------------------

    async def launch_pinned(self, runner: ProgramRunner) -> LaunchedInstance:
        """Start as the configuration says: from the pinned image, else from scratch."""
        ref = runner.config.restore
        if ref is None:
            return await launch_cold(runner)
        return await self.launch_with_fallback(runner, ref)

    async def launch_with_fallback(
        self,
        runner: ProgramRunner,
        image: ImageMeta | str,
        on_fallback: Callable[[str], None] | None = None,
    ) -> LaunchedInstance:
        """Restore from `image` (or a reference to one); on failure follow restore_fallback:
        "cold" starts the program from scratch, "fail" makes it FATAL with the reason."""
        try:
            if isinstance(image, str):
                try:
                    image = await trio.to_thread.run_sync(self.store.resolve, runner.name, image)
                except (LookupError, ValueError) as exc:
                    raise RestoreError(f"image {image!r} not usable: {exc}") from exc
            return await self.launch_from_image(runner, image)
        except RestoreError as exc:
            if runner.config.restore_fallback == "fail":
                raise RestoreError(str(exc), fatal=True) from exc
            log.warning("restore_fallback_cold", program=runner.name, reason=str(exc))
            if on_fallback is not None:
                on_fallback(str(exc))
            return await launch_cold(runner)


def _empty_stream() -> trio.lowlevel.FdStream:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    return trio.lowlevel.FdStream(read_fd)
