"""Checkpoint a running program into the image store: never a half image listed, the program
running on when the dump fails, a tree frozen by a checkpoint that stops it ended only once
its image is listed. Starting from an image is restores.Restores, which this builds on."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.criu.client import (
    CriuError,
    DumpRequest,
    TaskCondition,
    tree_condition,
)
from grenadine_sv.criu.facts import ImageFactsError, read_dump_facts
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox import SandboxProcess
from grenadine_sv.sandbox.linux import read_start_time, resume_sandbox
from grenadine_sv.sandbox.private_tmp import (
    EXTERNAL_MOUNT_NAME,
)
from grenadine_sv.store.definition import (
    record_definition,
)
from grenadine_sv.store.images import (
    DumpIntent,
    ImageMeta,
    Trigger,
    current_boot_id,
)
from grenadine_sv.store.snapshot import take_snapshot
from grenadine_sv.supervisor.definitions import (
    current_definition,
    snapshot_sources,
    warn_about_moved_sockets,
)
from grenadine_sv.supervisor.image_service import CheckpointError, CheckpointFailure
from grenadine_sv.supervisor.lazy import (
    wait_for_orphan_daemon,
)
from grenadine_sv.supervisor.restores import Restores
from grenadine_sv.supervisor.runner import (
    ProgramRunner,
)

log = structlog.get_logger()

MICROSECONDS = 1_000_000
DUMP_LOGS_SUBDIR = "dump-logs"
# Logs of failed dumps kept per program (the newest), for a user to read after the fact.
FAILED_DUMP_LOGS_KEPT = 5
NO_SPACE_TEXT = os.strerror(errno.ENOSPC)
# Below this, a failed dump is taken to have failed for want of space.
NEARLY_FULL_BYTES = 1 << 20
ORPHAN_KILL_WAIT_SECONDS = 10.0
KILLED_TREE_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class DumpSource:
    """The instance a dump is taken of."""

    pid: int
    start_time: int
    under_init: bool


class SealError(Exception):
    """CRIU dumped the program, but its image could not be made durable and listed."""


class CheckpointService(Restores):
    """Does one checkpoint or one restore of a program, one at a time per program: the dump
    into the image store (never a half image listed, the program running on when it fails),
    and a start from an image (verified first, following restore_fallback when it fails).
    Supervisor.checkpointing decides when; this class does it."""

    # checkpoint ----------------------------------------------------------------

    async def checkpoint(
        self, runner: ProgramRunner, trigger: Trigger, *, stop: bool = False
    ) -> ImageMeta:
        """Checkpoint a RUNNING program. With `stop` (or checkpoint.leave_running = false) it
        ends, never losing both program and image: CRIU dumps it and leaves every task frozen
        (TCP connections locked); the image is made durable and listed; only then is the
        frozen tree killed. The program never runs on after its dump (what it did then would
        vanish on restore) and never ends before its image is listed. If the dump or the
        sealing fails, the program runs on and CheckpointError says why. A supervisor killed
        on the way leaves a state the next one resolves (recovery)."""
        stop = stop or not runner.config.checkpoint.leave_running
        if stop:  # the programs that depend on it are left alone (no on_dependency_stop)
            with runner.leaving_dependents_alone():
                return await self._checkpoint(runner, trigger, stop=True)
        return await self._checkpoint(runner, trigger, stop=False)

    async def _checkpoint(
        self, runner: ProgramRunner, trigger: Trigger, *, stop: bool
    ) -> ImageMeta:
        program = runner.name
        async with self.images_of(program).lock:
            await self.images_of(program).memory_back()
            process = _running_process(runner)
            pid, start_time = process.pid, process.start_time
            bound = log.bind(program=program, pid=pid, trigger=trigger)
            # /proc reads: off the event loop, like everything that touches the dump.
            before = await trio.to_thread.run_sync(tree_condition, pid)
            if _running_process(runner) is not process:  # it ended meanwhile
                raise CheckpointError(f"{program} is {runner.state.value}, no longer RUNNING")
            instance = runner.stop_for_checkpoint() if stop else None
            source = DumpSource(pid, start_time, _under_init(runner))
            began = self.clock()
            try:
                image = await self._dump_in_worker(runner.config, source, trigger, frozen=stop)
            except CheckpointError as exc:
                if instance is not None:
                    runner.resume_instance(instance)
                after = await trio.to_thread.run_sync(tree_condition, pid)
                failure = exc
                if pid not in after:  # a stop, a restart or a crash during the dump
                    failure = CheckpointError(f"{program} ended while CRIU dumped it ({exc})")
                self.metrics.checkpoint_failed(program, trigger)
                bound.error("checkpoint_failed", error=str(failure))
                self.images_of(program).last_failure = CheckpointFailure(
                    datetime.now(UTC), trigger, str(failure)
                )
                _examine_after_failed_dump(runner, pid, before, after, bound)
                if failure is exc:
                    raise
                raise failure from exc
            if stop:
                # Listed and durable: the frozen tree may go now (its exit ends the instance).
                # Return once it has ended: its ports and files are free for what comes next.
                process.send_signal(signal.SIGKILL)
                await runner.wait_until(lambda s: s != State.STOPPING, KILLED_TREE_WAIT_SECONDS)
            return await self._checkpoint_done(runner, image, began, bound)

    async def _dump_in_worker(
        self, config: ProgramConfig, source: DumpSource, trigger: Trigger, *, frozen: bool
    ) -> ImageMeta:
        """Dump and list in a worker thread (never abandoned: CRIU is not left running
        unwatched); CheckpointError when it did not happen."""
        dump = self._dump_frozen if frozen else self._dump_leaving_running
        return await trio.to_thread.run_sync(dump, config, source, trigger, abandon_on_cancel=False)

    async def _checkpoint_done(
        self, runner: ProgramRunner, image: ImageMeta, began: float, bound: Any
    ) -> ImageMeta:
        program = runner.name
        duration = self.clock() - began
        frozen = image.dump_stats.get("frozen_time", 0) / MICROSECONDS
        self.metrics.checkpoint_succeeded(program, image.trigger, duration, frozen)
        self.images_of(program).last_checkpoint = image
        self.images_of(program).last_failure = None
        bound.info(
            "checkpoint_done",
            image_id=image.id,
            duration_seconds=round(duration, 3),
            frozen_seconds=frozen,
            image_bytes=image.image_bytes,
        )
        keep = runner.config.checkpoint.keep
        prune = partial(self.prune_images, program, keep, files_later=True)
        deleted = await trio.to_thread.run_sync(prune)
        for old in deleted:
            bound.info("image_pruned", image_id=old.id)
        if deleted:
            trio.lowlevel.spawn_system_task(self._remove_pruned_files, deleted)
        return image

    async def _remove_pruned_files(self, images: list[ImageMeta]) -> None:
        """After the checkpoint has answered: removing an image's files takes ~65 ms per
        256 MiB here, which the checkpoint command waited for. Unlisted already; a supervisor
        stopped meanwhile leaves the rest to the next one's start."""
        for image in images:
            try:
                await trio.to_thread.run_sync(self.store.remove_deleted_files, image)
            except OSError as exc:
                log.warning("image_files_not_removed", image_id=image.id, error=str(exc))

    def _dump(
        self,
        config: ProgramConfig,
        source: DumpSource,
        trigger: Trigger,
        leave_running: bool,
    ) -> ImageMeta:
        """Dump and list (in a worker thread). Without `leave_running` CRIU leaves the tasks
        frozen; a failure to seal them is then a SealError, the tasks still frozen."""
        sources = snapshot_sources(config, self.store.state_dir)
        intent = DumpIntent(
            definition=record_definition(current_definition(config)),
            trigger=trigger,
            criu_version=self.criu_version,
            definition_digest=config.definition_digest(),
            leave_running=leave_running,
            source_pid=source.pid,
            source_start_time=source.start_time,
            boot_id=current_boot_id(),
            init=source.under_init,
            private_tmp=config.private_tmp,
            snapshot=sorted(sources),
        )
        with self._begin_lock:
            pending = self.store.begin(config.name, intent)
        with pending:
            try:
                self.criu.dump(
                    DumpRequest(
                        pid=source.pid,
                        images_dir=pending.criu_dir,
                        leave_running=leave_running,
                        leave_stopped=not leave_running,
                        on_post_dump=(
                            partial(self._snapshot, config.name, sources, pending.criu_dir)
                            if sources
                            else None
                        ),
                        options=self.criu_options(config),
                        external_mounts=(
                            {"/tmp": EXTERNAL_MOUNT_NAME} if config.private_tmp else {}
                        ),
                        hold_fds=self.hold_fds,
                    )
                )
            except CriuError as exc:
                detail = exc.detail
                free = self.store.free_bytes()
                if free < NEARLY_FULL_BYTES and NO_SPACE_TEXT not in detail:
                    # CRIU's own log may be cut short by the full disk: say it here.
                    detail = f"{NO_SPACE_TEXT} ({free} bytes free); {detail}"
                # The partial image, and the log in it, go when `pending` is aborted.
                kept = self._keep_failed_dump_log(config.name, pending.id, exc.log_path)
                raise CriuError(exc.action, detail, kept) from exc
            warn_about_moved_sockets(config, pending.criu_dir, self.store.state_dir)
            try:
                facts = partial(read_dump_facts, pending.criu_dir, under_init=source.under_init)
                # Queued for upload before it is listed: a supervisor killed in between
                # leaves a sealed partial that the next one lists, and its queue entry.
                queue = partial(self.remote.image_sealed, config) if self.remote else None
                return pending.commit(facts, before_publish=queue)
            except (ImageFactsError, OSError, ValueError) as exc:
                if leave_running:
                    raise
                raise SealError(self._failure_message(exc)) from exc

    def _dump_frozen(
        self,
        config: ProgramConfig,
        source: DumpSource,
        trigger: Trigger,
    ) -> ImageMeta:
        """Dump leaving the tree frozen, and list the image; on failure the tree runs on and
        CheckpointError says why (in a worker thread)."""
        try:
            return self._dump(config, source, trigger, False)
        except SealError as exc:
            resumed = resume_sandbox(source.pid)
            log.error(
                "checkpoint_seal_failed", program=config.name, pid=source.pid, resumed=resumed
            )
            raise CheckpointError(
                f"the dump succeeded but could not be stored: {exc}; the program was resumed "
                f"({resumed} processes) and no image was kept"
                + (
                    " (its established TCP connections stay held by the dump and will fail)"
                    if config.checkpoint.tcp_established
                    else ""
                )
            ) from exc
        except (CriuError, ImageFactsError, OSError, ValueError) as exc:
            raise CheckpointError(self._failure_message(exc)) from exc

    def _dump_leaving_running(
        self, config: ProgramConfig, source: DumpSource, trigger: Trigger
    ) -> ImageMeta:
        """Dump leaving the tree running, and list the image; CheckpointError says why not
        (in a worker thread)."""
        try:
            return self._dump(config, source, trigger, True)
        except (CriuError, ImageFactsError, OSError, ValueError) as exc:
            raise CheckpointError(self._failure_message(exc)) from exc

    def _keep_failed_dump_log(
        self, program: str, image_id: str, dump_log: Path | None
    ) -> Path | None:
        """Move a failed dump's log to state_dir/dump-logs/PROGRAM/ (0600), keeping the newest
        few; returns where it now is (or None when there was none)."""
        if dump_log is None or not dump_log.is_file():
            return None
        logs_dir = self.store.state_dir / DUMP_LOGS_SUBDIR / program
        kept = logs_dir / f"dump-{image_id}.log"
        try:
            logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.rename(dump_log, kept)  # same filesystem: needs no free space
            os.chmod(kept, 0o600)
            older = sorted(logs_dir.glob("dump-*.log"), key=lambda p: p.stat().st_mtime)
            for old in older[:-FAILED_DUMP_LOGS_KEPT]:
                old.unlink()
        except OSError as exc:
            log.warning("dump_log_not_kept", path=str(dump_log), error=str(exc))
            return None
        return kept

    def _failure_message(self, exc: Exception) -> str:
        """What went wrong, and for a full disk what to do about it."""
        no_space = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
            isinstance(exc, CriuError) and NO_SPACE_TEXT in exc.detail
        )
        if not no_space:
            return str(exc)
        return (
            f"no space left on the filesystem of state_dir {self.store.state_dir} (ENOSPC): "
            "the dump was discarded and earlier images are untouched; free some space, lower "
            f"checkpoint.keep or run grenadine-sv prune ({exc})"
        )

    async def recover_orphan(self, config: ProgramConfig, pid: int, start_time: int) -> ImageMeta:
        """Checkpoint a sandbox left running by a previous supervisor and end it (its image
        listed first, as `checkpoint(stop=True)` does), so that it can be restored as a child of
        this one. On failure it runs on."""
        async with self.images_of(config.name).lock:
            await wait_for_orphan_daemon(self.work_dir / config.name)
            source = DumpSource(pid, start_time, config.init)
            try:
                image = await self._dump_in_worker(config, source, "recovery", frozen=True)
            except CheckpointError:
                self.metrics.checkpoint_failed(config.name, "recovery")
                raise
            await kill_frozen_orphan(pid, start_time)
            self.images_of(config.name).last_checkpoint = image
            return image

    def _snapshot(self, program: str, sources: dict[str, Path], criu_dir: Path) -> None:
        """Copy the program's files into the image (CRIU's post-dump: the program is frozen)."""
        began = self.clock()
        summary = take_snapshot(sources, criu_dir.parent)
        log.info(
            "snapshot_taken",
            program=program,
            paths=summary.paths,
            bytes=summary.bytes_copied,
            seconds=round(self.clock() - began, 3),
        )


def _under_init(runner: ProgramRunner) -> bool:
    return runner.process is not None and runner.process.under_init


def _running_process(runner: ProgramRunner) -> SandboxProcess:
    """The program's RUNNING process, or CheckpointError."""
    process = runner.running_process()
    if process is None:
        raise CheckpointError(f"{runner.name} is {runner.state.value}, not RUNNING")
    return process


async def kill_frozen_orphan(pid: int, start_time: int) -> None:
    """SIGKILL a sandbox that is not our child (its PID 1 takes the rest along) and wait,
    bounded, until it is gone; never signal a pid that names another process by now."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if read_start_time(pid) != start_time:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with trio.move_on_after(ORPHAN_KILL_WAIT_SECONDS):
            await trio.lowlevel.wait_readable(pidfd)
    except (FileNotFoundError, ProcessLookupError):
        return
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def _examine_after_failed_dump(
    runner: ProgramRunner,
    pid: int,
    before: dict[int, TaskCondition],
    after: dict[int, TaskCondition],
    bound: Any,
) -> None:
    """CRIU that fails (or dies) mid-dump lets go of the tree: the kernel detaches its tasks and
    the parasite code returns them to where they were. Check that, and say what was left behind."""
    if pid not in after:
        # The exit reaches the runner, which restarts the program per its autorestart.
        bound.warning("program_gone_after_failed_checkpoint")
        return
    mappings = sum(condition.parasite_mappings for condition in after.values())
    if mappings > sum(condition.parasite_mappings for condition in before.values()):
        bound.warning(
            "criu_parasite_left_mapped",
            mappings=mappings,
            detail="the program runs on; CRIU's code stays mapped in it until its next restart",
        )
    process = runner.process
    if process is None or process.pid != pid or process.returncode is not None:
        return
    for task, condition in after.items():
        was_stopped = task in before and before[task].stopped
        if condition.stopped and not was_stopped and condition.tracer_pid == 0:
            if task == pid:
                process.send_signal(signal.SIGCONT)
            else:
                # A task of the tree we still hold (its root is our live child).
                os.kill(task, signal.SIGCONT)
            bound.warning("program_resumed_after_failed_checkpoint", task_pid=task)
