"""A program started from an image: verified first (or, for a lazy restore, served while it
is verified), restored by CRIU as a child of this process with its output pipes re-attached,
and on failure what restore_fallback says."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import structlog
import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.criu.client import (
    CriuError,
    RestoreRequest,
    pipe_key,
)
from grenadine_sv.sandbox import SandboxProcess
from grenadine_sv.sandbox.linux import read_start_time
from grenadine_sv.sandbox.private_tmp import (
    EXTERNAL_MOUNT_NAME,
    ensure_private_tmp,
    private_tmp_dir,
)
from grenadine_sv.store.images import (
    ImageCorrupt,
    ImageMeta,
)
from grenadine_sv.store.snapshot import write_back
from grenadine_sv.supervisor.cold_start import launch_cold
from grenadine_sv.supervisor.definitions import (
    OLD_FORMAT_WARNING,
    changed_definition_message,
    check_definition,
    snapshot_sources,
)
from grenadine_sv.supervisor.image_service import ImageService, RestoreError, restore_log_name
from grenadine_sv.supervisor.lazy import (
    LazyMemory,
    LazyPagesError,
    end_daemon,
    is_page_file,
    lazy_log_name,
    start_lazy_pages,
)
from grenadine_sv.supervisor.output import enlarge_pipe
from grenadine_sv.supervisor.remote_refs import REMOTE_PREFIX, RemoteUnavailable
from grenadine_sv.supervisor.runner import (
    LaunchedInstance,
    ProgramRunner,
    RestoredFrom,
)

log = structlog.get_logger()


# Told why a restore fell back, and which older image it restored instead (None: cold).
FallbackObserver = Callable[[str, ImageMeta | None], None]


class Restores(ImageService):
    """Starts a program from an image, one restore or checkpoint at a time per program."""

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
                    work_dir = await trio.to_thread.run_sync(self._work_dir_of, program)
                    # Concurrent lazy restores (a take-back restores every program at once)
                    # stalled in CRIU for up to 30 s with their restored tasks spinning in page
                    # faults; one at a time each takes a fraction of a second.
                    async with self._lazy_restore_lock:
                        daemon = await self._verified_daemon(image, work_dir)
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

    async def _verified_daemon(self, image: ImageMeta, work_dir: Path) -> trio.Process:
        """`criu lazy-pages` for `image`, started while the image's files other than its pages
        are verified (in a worker thread): the daemon serves nothing before a restore connects
        to it, which waits for both. If the verification fails the daemon is ended and its
        error raised (it comes first: a corrupt image is marked so)."""
        daemon: trio.Process | None = None
        failures: list[Exception] = []

        async def verify() -> None:
            try:
                await trio.to_thread.run_sync(self._verify, image, True)
            except Exception as exc:  # raised below, once the daemon is settled
                failures.insert(0, exc)

        async def start() -> None:
            nonlocal daemon
            try:
                daemon = await start_lazy_pages(
                    self.criu, self.store.criu_dir(image), work_dir, lazy_log_name(image)
                )
            except Exception as exc:  # raised below, after the verification's
                failures.append(exc)

        usable = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(verify)
                nursery.start_soon(start)
            usable = not failures
        finally:
            if daemon is not None and not usable:  # a failure, or cancelled meanwhile
                with trio.CancelScope(shield=True):
                    await end_daemon(daemon)
        if failures:
            raise failures[0]
        assert daemon is not None
        return daemon

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


def _restorer_recorder(runner: ProgramRunner) -> Callable[[int], None] | None:
    """Records the CRIU process on the program's cgroup before it restores, so a supervisor
    started after this one is killed waits for it rather than starting a second copy."""
    cgroup = runner.cgroup
    if cgroup is None:
        return None

    def record(criu_pid: int) -> None:
        cgroup.set_restorer(criu_pid, read_start_time(criu_pid))

    return record


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
