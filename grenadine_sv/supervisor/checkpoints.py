"""Checkpoint a running program into the image store, and start a program from an image.

Longer than most modules (about 650 lines): a checkpoint and a restore of a program share
its lock, the store, the metrics and the failure reporting, and the code for crash safety
around both (frozen trees, orphans) is being extended; splitting the restore half out is
the next step once that settles."""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.config.models import RESTORE_COMPARED_FIELDS
from grenadine_sv.criu.client import (
    Criu,
    CriuError,
    DumpRequest,
    RestoreRequest,
    TaskCondition,
    pipe_key,
    tree_condition,
)
from grenadine_sv.criu.facts import ImageFactsError, listening_unix_sockets, read_dump_facts
from grenadine_sv.criu.options import CriuOptions, NetworkLocks, probe_network_locks
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox import SandboxError, SandboxProcess
from grenadine_sv.sandbox.linux import read_start_time, resume_sandbox
from grenadine_sv.sandbox.private_tmp import (
    EXTERNAL_MOUNT_NAME,
    ensure_private_tmp,
    private_tmp_dir,
)
from grenadine_sv.store.definition import (
    CurrentDefinition,
    DefinitionCheck,
    definition_changes,
    record_definition,
)
from grenadine_sv.store.images import (
    DumpIntent,
    ImageCorrupt,
    ImageMeta,
    ImageStore,
    Trigger,
    current_boot_id,
)
from grenadine_sv.store.snapshot import take_snapshot, write_back
from grenadine_sv.supervisor.lazy import (
    LazyMemory,
    LazyPagesError,
    end_daemon,
    is_page_file,
    lazy_log_name,
    start_lazy_pages,
    wait_for_orphan_daemon,
)
from grenadine_sv.supervisor.output import enlarge_pipe
from grenadine_sv.supervisor.remote import REMOTE_PREFIX, RemoteImages, RemoteUnavailable
from grenadine_sv.supervisor.runner import (
    LaunchedInstance,
    ProgramRunner,
    RestoredFrom,
    launch_cold,
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


class CheckpointError(Exception):
    """A checkpoint did not happen; the program is as it was and no image was kept."""


@dataclass(frozen=True)
class DumpSource:
    """The instance a dump is taken of."""

    pid: int
    start_time: int
    under_init: bool


class SealError(Exception):
    """CRIU dumped the program, but its image could not be made durable and listed."""


class RestoreError(SandboxError):
    """A restore did not happen; the message says why."""


# Told why a restore fell back, and which older image it restored instead (None: cold).
FallbackObserver = Callable[[str, ImageMeta | None], None]


class CheckpointMetrics(Protocol):
    def checkpoint_succeeded(
        self, program: str, trigger: str, duration_seconds: float, frozen_seconds: float
    ) -> None: ...

    def checkpoint_failed(self, program: str, trigger: str) -> None: ...

    def restore_succeeded(self, program: str, duration_seconds: float) -> None: ...

    def restore_failed(self, program: str) -> None: ...

    def restore_memory_complete(self, program: str, seconds: float) -> None: ...


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

    def restore_memory_complete(self, program: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class CheckpointFailure:
    at: datetime
    trigger: Trigger
    error: str


@dataclass
class ProgramImages:
    """What the checkpoint layer keeps per program across its instances."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    last_checkpoint: ImageMeta | None = None
    # The newest failed checkpoint, until one succeeds.
    last_failure: CheckpointFailure | None = None
    lazy: LazyMemory | None = None
    """The last lazy restore of the program (its memory may still be coming back)."""

    async def memory_back(self) -> None:
        """Wait until a lazy restore of the program has all its memory back."""
        if self.lazy is not None:
            await self.lazy.done.wait()

    def serving_image_id(self) -> str | None:
        """The image a lazy restore still serves memory from (it must not be pruned)."""
        if self.lazy is None or self.lazy.done.is_set():
            return None
        return self.lazy.image.id


class CheckpointService:
    """Does one checkpoint or one restore of a program, one at a time per program: the dump
    into the image store (never a half image listed, the program running on when it fails),
    and a start from an image (verified first, following restore_fallback when it fails).
    Supervisor.checkpointing decides when; this class does it."""

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
        # Dumps run in worker threads; ImageStore.begin creates shared directories unguarded.
        self._begin_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._network_locks: NetworkLocks | None = None
        self.clock: Callable[[], float] = time.monotonic
        # Fds every CRIU dump holds while it runs (the supervisor's state_dir lock).
        self.hold_fds: tuple[int, ...] = ()
        # Images a lazy restore found corrupt while serving them: never restored again.
        self._corrupt: set[str] = set()
        # Lazy restores run CRIU one at a time (see restore_from).
        self._lazy_restore_lock = trio.Lock()
        # The object store, when [supervisor.remote] has a url: uploads and remote restores.
        self.remote: RemoteImages | None = None
        # Image id -> restores of it under way: retention and prune leave those images alone.
        self._in_use: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def using(self, image: ImageMeta) -> Iterator[None]:
        """While inside, `image` is not pruned (a restore of it is on its way)."""
        self._in_use[image.id] += 1
        try:
            yield
        finally:
            self._in_use[image.id] -= 1
            if not self._in_use[image.id]:
                del self._in_use[image.id]

    def images_of(self, program: str) -> ProgramImages:
        return self._programs.setdefault(program, ProgramImages())

    def learn_last_checkpoint(self, program: str) -> None:
        """Take a program's newest image from the store (status shows it after a restart)."""
        listed = self.store.list(program)
        self.images_of(program).last_checkpoint = listed[0] if listed else None

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
                self.metrics.checkpoint_failed(program, trigger)
                bound.error("checkpoint_failed", error=str(exc))
                self.images_of(program).last_failure = CheckpointFailure(
                    datetime.now(UTC), trigger, str(exc)
                )
                after = await trio.to_thread.run_sync(tree_condition, pid)
                _examine_after_failed_dump(runner, pid, before, after, bound)
                raise
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
        deleted = await trio.to_thread.run_sync(self.prune_images, program, keep)
        for old in deleted:
            bound.info("image_pruned", image_id=old.id)
        return image

    def remove_image(self, image: ImageMeta) -> None:
        """Delete one image (and its restore log), whatever its place in the retention."""
        self.store.delete(image)
        with contextlib.suppress(FileNotFoundError):
            (self.work_dir / image.program / restore_log_name(image)).unlink()
        if self.images_of(image.program).last_checkpoint == image:
            self.learn_last_checkpoint(image.program)

    def prune_images(self, program: str, keep: int) -> list[ImageMeta]:
        """Apply retention to `program`'s images, with the restore logs of those deleted."""
        in_use = set(self._in_use)
        if self.remote is not None:
            in_use |= self.remote.pinned(program)
        serving = self.images_of(program).serving_image_id()
        if serving is not None:
            in_use.add(serving)
        deleted = self.store.prune(program, keep, in_use=in_use)
        if self.images_of(program).last_checkpoint in deleted:
            self.learn_last_checkpoint(program)
        for image in deleted:
            with contextlib.suppress(FileNotFoundError):
                (self.work_dir / program / restore_log_name(image)).unlink()
        return deleted

    def network_locks(self) -> NetworkLocks:
        """Which network locks work here, probed once (blocking: call it in a worker thread)."""
        with self._probe_lock:
            if self._network_locks is None:
                self._network_locks = probe_network_locks(self.criu.binary)
            return self._network_locks

    def criu_options(self, config: ProgramConfig) -> CriuOptions:
        """CRIU's options for `config` (blocking: may probe the network locks)."""
        policy = config.checkpoint
        network_lock = self.network_locks().choose(policy.network_lock)
        if network_lock is None:
            if policy.tcp_established:
                raise CriuError(
                    "dump",
                    "checkpoint.tcp_established needs a network lock, and this host has none"
                    " (this CRIU lacks nftables support and iptables is not installed): install"
                    ' iptables, or set checkpoint.network_lock = "skip" (peers may then see'
                    " resets while the program is stopped)",
                    None,
                )
            network_lock = "skip"  # only established connections use it
        return CriuOptions(
            file_locks=policy.file_locks,
            tcp_established=policy.tcp_established,
            network_lock=network_lock,
            external_unix_sockets=policy.external_unix_sockets,
            ghost_limit=int(policy.ghost_limit),
            skip_in_flight=policy.skip_in_flight,
            tcp_close=policy.tcp_close,
        )

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
                with pending.watch():
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
            _warn_about_moved_sockets(config, pending.criu_dir, self.store.state_dir)
            try:
                facts = read_dump_facts(pending.criu_dir, under_init=source.under_init)
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

    # restore -------------------------------------------------------------------

    async def launch_from_image(
        self,
        runner: ProgramRunner,
        image: ImageMeta,
        occasion: str | None = None,
        instead_of: str | None = None,
        *,
        allow_changed_definition: bool = False,
    ) -> LaunchedInstance:
        """Restore `image` as the program's new instance (a child of this process); the
        runner remembers it (status, metrics) with the occasion (default: why it starts).
        An image taken under another definition is refused (RestoreError naming what
        changed) unless `allow_changed_definition`."""
        program = runner.name
        occasion = occasion or runner.start_cause
        check = check_definition(runner.config, image)
        if not check.unchanged:
            if not allow_changed_definition:
                self.metrics.restore_failed(program)
                raise RestoreError(changed_definition_message(image, check))
            log.warning(
                "restore_into_changed_definition",
                program=program,
                image_id=image.id,
                changes=check.describe(),
            )
        elif not check.recorded_fields:
            log.warning(
                "image_definition_not_recorded",
                program=program,
                image_id=image.id,
                detail=OLD_FORMAT_WARNING,
            )
        images = self.images_of(program)
        lazy = runner.config.restore_mode == "lazy"
        async with images.lock:
            began = self.clock()
            daemon: trio.Process | None = None
            try:
                if lazy:
                    await trio.to_thread.run_sync(self._verify, image, True)
                    work_dir = await trio.to_thread.run_sync(self._work_dir_of, program)
                    # Concurrent lazy restores (a take-back restores every program at once)
                    # stalled in CRIU for up to 30 s with their restored tasks spinning in page
                    # faults; one at a time each takes a fraction of a second.
                    async with self._lazy_restore_lock:
                        daemon = await start_lazy_pages(
                            self.criu, self.store.criu_dir(image), work_dir, lazy_log_name(image)
                        )
                        pid, output_fds, held = await trio.to_thread.run_sync(
                            self._restore, runner, image, lazy, abandon_on_cancel=False
                        )
                else:
                    pid, output_fds, held = await trio.to_thread.run_sync(
                        self._restore, runner, image, lazy, abandon_on_cancel=False
                    )
            except (CriuError, ImageCorrupt, OSError, LazyPagesError) as exc:
                if daemon is not None:
                    await end_daemon(daemon)
                if isinstance(exc, ImageCorrupt):
                    await trio.to_thread.run_sync(
                        self.store.mark_corrupt, image, f"{exc.path} {exc.reason}"
                    )
                self.metrics.restore_failed(program)
                log.error("restore_failed", program=program, image_id=image.id, error=str(exc))
                raise RestoreError(f"restore of {program} from {image.id} failed: {exc}") from exc
            launched = _launched_instance(pid, image, output_fds, held)
            if daemon is not None:
                images.lazy = LazyMemory(
                    self.store,
                    image,
                    daemon,
                    work_dir=self.work_dir / program,
                    began=began,
                    on_complete=partial(self.metrics.restore_memory_complete, program),
                    on_corrupt=lambda bad: self._corrupt.add(bad.id),
                )
                launched.companions.append(images.lazy.supervise)
            duration = self.clock() - began
            self.metrics.restore_succeeded(program, duration)
            runner.restored_from = RestoredFrom(image.id, image.created, occasion, instead_of)
            log.info(
                "restore_done",
                program=program,
                image_id=image.id,
                image_created=image.created.isoformat(),
                occasion=occasion,
                pid=launched.process.pid,
                duration_seconds=round(duration, 3),
                restore_mode=runner.config.restore_mode,
            )
            return launched

    def _verify(self, image: ImageMeta, lazy: bool) -> None:
        """Check the image before a restore: every file, or for a lazy one all but the page
        files (LazyMemory hashes those while they are served)."""
        self.store.check_trusted()
        if image.id in self._corrupt:
            raise ImageCorrupt(image, "criu/pages-*.img", "did not match while it was served")
        self.store.verify(image, skip=is_page_file if lazy else None)

    def _work_dir_of(self, program: str) -> Path:
        work_dir = self.work_dir / program
        for directory in (self.work_dir, work_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        return work_dir

    def _restore_mounts(self, program: str, image: ImageMeta) -> dict[str, str]:
        """The host directories a restore of `image` binds in place of its named mounts."""
        if not image.private_tmp:
            return {}
        tmp = ensure_private_tmp(private_tmp_dir(self.store.state_dir, program))
        return {EXTERNAL_MOUNT_NAME: str(tmp)}

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

    def _restore(
        self, runner: ProgramRunner, image: ImageMeta, lazy: bool
    ) -> tuple[int, dict[int, int], tuple[str, ...]]:
        """Run CRIU's restore (in a worker thread). Returns the restored root's pid; per
        stdio pipe inode of the image, the read end of the new pipe that replaces it; and the
        keys under which the stdio keeper holds those read ends.

        Only raw fds cross the thread boundary: trio streams are closed in trio's thread."""
        if not lazy:  # a lazy restore verified what it could before starting its daemon
            self._verify(image, False)
        if image.snapshot:
            if image.private_tmp:
                # On a host where the program never ran, its private /tmp's parent is new.
                ensure_private_tmp(private_tmp_dir(self.store.state_dir, runner.name))
            # Only what the current definition lists goes back (the image may list more).
            targets = snapshot_sources(runner.config, self.store.state_dir)
            written = write_back(self.store.criu_dir(image).parent, targets)
            log.info("snapshot_written_back", program=runner.name, paths=written)
        work_dir = self._work_dir_of(runner.name)
        write_fds: dict[int, int] = {}
        read_fds: dict[int, int] = {}
        held: list[str] = []
        try:
            for stream, inode in image.stdio_pipes.items():
                if inode in read_fds:
                    continue
                read_fds[inode], write_fds[inode] = os.pipe()
                enlarge_pipe(read_fds[inode])
                os.set_inheritable(write_fds[inode], True)
                # Held before CRIU runs: a supervisor killed mid-restore leaves them kept.
                key = runner.context.keep_pipe(runner.name, stream, read_fds[inode])
                if key is not None:
                    held.append(key)
            pid = self.criu.restore(
                RestoreRequest(
                    images_dir=self.store.criu_dir(image),
                    work_dir=work_dir,
                    inherit_fds={pipe_key(inode): fd for inode, fd in write_fds.items()},
                    options=self.criu_options(runner.config),
                    external_mounts=self._restore_mounts(runner.name, image),
                    log_name=restore_log_name(image),
                    lazy_pages=lazy,
                    on_criu_started=_restorer_recorder(runner),
                    cgroup_root=(
                        runner.cgroup.hierarchy_path() if runner.cgroup is not None else None
                    ),
                )
            )
        except BaseException:
            runner.context.release_pipes(tuple(held))
            for fd in read_fds.values():
                os.close(fd)
            raise
        finally:
            for fd in write_fds.values():
                os.close(fd)
            _make_files_private(work_dir)
            if runner.cgroup is not None:
                runner.cgroup.clear_restorer()
        return pid, read_fds, tuple(held)

    # launchers -----------------------------------------------------------------

    async def launch_pinned(self, runner: ProgramRunner) -> LaunchedInstance:
        """Start as the configuration says: from the pinned image when `restore_on` names
        the occasion, else from scratch."""
        ref = runner.config.restore
        if ref is None:
            return await launch_cold(runner)
        if runner.start_cause not in runner.config.restore_on:
            log.info(
                "restore_not_on",
                program=runner.name,
                occasion=runner.start_cause,
                restore_on=runner.config.restore_on,
            )
            return await launch_cold(runner)
        return await self.launch_with_fallback(runner, ref)

    async def launch_with_fallback(
        self,
        runner: ProgramRunner,
        image: ImageMeta | str,
        on_fallback: FallbackObserver | None = None,
        occasion: str | None = None,
        *,
        allow_changed_definition: bool = False,
    ) -> LaunchedInstance:
        """Restore from `image` (or a reference to one); on failure follow restore_fallback:
        "cold" starts the program from scratch, "fail" makes it FATAL with the reason,
        "previous" restores the next older image that restores (else starts cold). "latest"
        is the newest image only: one that cannot be used is replaced by an older one only
        when restore_fallback = "previous" says so, and visibly."""
        try:
            if isinstance(image, str):
                try:
                    image = await self.resolve_for_start(
                        runner.config, image, allow_changed_definition=allow_changed_definition
                    )
                except (LookupError, ValueError, RemoteUnavailable) as exc:
                    raise RestoreError(f"image {image!r} not usable: {exc}") from exc
            return await self.launch_from_image(
                runner, image, occasion, allow_changed_definition=allow_changed_definition
            )
        except RestoreError as exc:
            fallback = runner.config.restore_fallback
            if fallback == "fail":
                raise RestoreError(str(exc), fatal=True) from exc
            if fallback == "previous":
                failed = image if isinstance(image, ImageMeta) else None
                for older in await trio.to_thread.run_sync(self._older_images, runner.name, failed):
                    asked = image.id if isinstance(image, ImageMeta) else image
                    try:
                        launched = await self.launch_from_image(runner, older, occasion, asked)
                    except RestoreError:
                        continue
                    log.warning(
                        "restore_fallback_previous",
                        program=runner.name,
                        image_id=older.id,
                        reason=str(exc),
                    )
                    if on_fallback is not None:
                        on_fallback(str(exc), older)
                    return launched
            log.warning("restore_fallback_cold", program=runner.name, reason=str(exc))
            if on_fallback is not None:
                on_fallback(str(exc), None)
            await runner.claim_cgroup()  # what the failed restore may have left there
            return await launch_cold(runner)

    def _older_images(self, program: str, failed: ImageMeta | None) -> list[ImageMeta]:
        """The images older than `failed` (all, without one), newest first, without those
        already known to be corrupt."""
        listed = self.store.list(program)
        if failed is not None:
            listed = [m for m in listed if (m.created, m.id) < (failed.created, failed.id)]
        return [m for m in listed if self.store.corruption(m) is None]

    async def resolve_for_start(
        self, config: ProgramConfig, ref: str, *, allow_changed_definition: bool = False
    ) -> ImageMeta:
        """The image `ref` names: local, or "remote:REF", or "latest" under restore_source."""
        if self.remote is not None:
            return await self.remote.resolve_pinned(
                config, ref, allow_changed_definition=allow_changed_definition
            )
        if ref.startswith(REMOTE_PREFIX):
            raise RemoteUnavailable("no object store is configured ([supervisor.remote] url)")
        return await trio.to_thread.run_sync(self.store.resolve, config.name, ref)


OLD_FORMAT_WARNING = (
    "this image is from an older grenadine-sv and records only a digest of its program's "
    "definition: it matched, but what it was taken under cannot be shown"
)


def host_path(config: ProgramConfig, path: Path, state_dir: Path) -> Path:
    """Where a path the program sees is on the host (its private /tmp is elsewhere)."""
    bound = any(path.is_relative_to(bind) for bind in config.binds)
    if config.private_tmp and path.is_relative_to("/tmp") and not bound:
        return private_tmp_dir(state_dir, config.name) / path.relative_to("/tmp")
    return path


def _warn_about_moved_sockets(config: ProgramConfig, criu_dir: Path, state_dir: Path) -> None:
    """Name each listening unix socket that is no longer at the path it was bound to (haproxy
    binds admin.sock.PID.tmp, then renames it): CRIU restores it at the bound path."""
    try:
        bound_paths = listening_unix_sockets(criu_dir)
    except ImageFactsError as exc:
        log.warning("unix_sockets_unknown", program=config.name, error=str(exc))
        return
    for bound in bound_paths:
        if not os.path.exists(host_path(config, Path(bound), state_dir)):
            log.warning(
                "unix_socket_moved_after_bind",
                program=config.name,
                socket=bound,
                detail=f"a restore re-creates this socket at {bound}, where it was bound, not"
                " where the program moved it: clients of the moved path will not reach it",
            )


def snapshot_sources(config: ProgramConfig, state_dir: Path) -> dict[str, Path]:
    """Program path -> host path of the files an image of `config` holds a copy of: the
    private /tmp, and checkpoint.snapshot (seen through the private /tmp when below it)."""
    tmp = private_tmp_dir(state_dir, config.name) if config.private_tmp else None
    sources: dict[str, Path] = {}
    if tmp is not None:
        sources["/tmp"] = tmp
    for path in config.checkpoint.snapshot:
        bound = any(path.is_relative_to(bind) for bind in config.binds)
        if tmp is not None and path.is_relative_to("/tmp") and not bound:
            continue  # inside the private /tmp, copied with it
        sources[str(path)] = path  # the sandbox sees the host's / and binds at their paths
    return sources


def current_definition(config: ProgramConfig) -> CurrentDefinition:
    """What an image records, and a restore compares, of a program's definition."""
    compared = {name for name in RESTORE_COMPARED_FIELDS if name in type(config).model_fields}
    return CurrentDefinition(
        fields=config.model_dump(mode="json", include=compared),
        environment=dict(config.environment),
        digest=config.definition_digest(),
    )


def check_definition(config: ProgramConfig, image: ImageMeta) -> DefinitionCheck:
    return definition_changes(image.definition, image.definition_digest, current_definition(config))


def changed_definition_message(image: ImageMeta, check: DefinitionCheck) -> str:
    return (
        f"image {image.id} of {image.program} was taken under another definition of the "
        f"program ({check.describe()}); restoring it would bring the old one back. Restore it "
        "anyway with `grenadine-sv restore --allow-changed-definition`, or take a new image"
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


def _restorer_recorder(runner: ProgramRunner) -> Callable[[int], None] | None:
    """Records the CRIU process on the program's cgroup before it restores, so a supervisor
    started after this one is killed waits for it rather than starting a second copy."""
    cgroup = runner.cgroup
    if cgroup is None:
        return None

    def record(criu_pid: int) -> None:
        cgroup.set_restorer(criu_pid, read_start_time(criu_pid))

    return record


def restore_log_name(image: ImageMeta) -> str:
    return f"restore-{image.id}.log"


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


def _make_files_private(directory: Path) -> None:
    """CRIU creates its logs and statistics with the process umask: make them 0600."""
    with contextlib.suppress(OSError):  # best effort: the directory itself is 0700
        for entry in directory.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, 0o600)


def _launched_instance(
    pid: int, image: ImageMeta, read_fds: dict[int, int], held: tuple[str, ...]
) -> LaunchedInstance:
    """Take charge of a restored root and of its output pipes (in trio's thread)."""
    stdout_fd = read_fds.pop(image.stdio_pipes.get("stdout", -1), None)
    stderr_fd = read_fds.pop(image.stdio_pipes.get("stderr", -1), None)
    for unused in read_fds.values():
        os.close(unused)
    try:
        process = SandboxProcess.adopt(pid, under_init=image.init)
    except BaseException:
        for fd in (stdout_fd, stderr_fd):
            if fd is not None:
                os.close(fd)
        raise
    return LaunchedInstance(process, _stream(stdout_fd), _stream(stderr_fd), held)


def _stream(read_fd: int | None) -> trio.lowlevel.FdStream:
    return trio.lowlevel.FdStream(read_fd) if read_fd is not None else _empty_stream()


def _empty_stream() -> trio.lowlevel.FdStream:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    return trio.lowlevel.FdStream(read_fd)
