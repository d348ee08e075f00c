"""Lazy restore (post-copy): the program runs again as soon as CRIU has rebuilt it, and CRIU's
`lazy-pages` daemon serves its anonymous memory through userfaultfd, on demand and then in the
background, until every page is in.

The daemon is a supervised child: if it ends before every page is in, or if a page file of the
image does not match its digest (hashed in the background while the daemon serves it), the
program is killed and counts as crashed: never a program silently missing memory. Until all
memory is back, the program's checkpoints wait and its image cannot be pruned.

The daemon runs in its own session, so it outlives a supervisor killed meanwhile; it records
its pid in the program's work directory, and a supervisor that takes the program back waits
for it to finish before dumping.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio

from grenadine_sv.criu.client import Criu, error_lines
from grenadine_sv.sandbox import SandboxError, SandboxProcess
from grenadine_sv.store.images import ImageCorrupt, ImageMeta, ImageStore

log = structlog.get_logger()

PAGE_FILE = re.compile(r"pages-[0-9]+\.img")
PIDFILE = "lazy-pages.pid"
# How long the daemon may take to listen on its socket.
DAEMON_READY_SECONDS = 30.0
# A supervisor that takes back a program whose memory a previous one was still serving waits
# this long at most for the daemon to finish.
ORPHAN_DAEMON_WAIT_SECONDS = 600.0
# How long a daemon may take to end once its supervision is over.
DAEMON_REAP_SECONDS = 5.0


def is_page_file(rel: str) -> bool:
    """Whether `rel` (a path under an image's criu/) holds memory pages, served lazily."""
    return PAGE_FILE.fullmatch(rel) is not None


def lazy_log_name(image: ImageMeta) -> str:
    return f"lazy-pages-{image.id}.log"


class LazyPagesError(SandboxError):
    """The lazy-pages daemon could not be started."""


async def start_lazy_pages(
    criu: Criu, images_dir: Path, work_dir: Path, log_name: str
) -> trio.Process:
    """Start `criu lazy-pages` for an image and return it (a trio Process) once it listens."""
    ready_read, ready_write = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            criu.lazy_pages_command(images_dir, work_dir, ready_write, log_name),
            pass_fds=(ready_write,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work_dir,
            start_new_session=True,  # outlives a supervisor killed while it serves
        )
    except OSError as exc:
        os.close(ready_read)
        raise LazyPagesError(f"cannot run {criu.binary} lazy-pages: {exc.strerror}") from exc
    finally:
        os.close(ready_write)
    ready = trio.lowlevel.FdStream(ready_read)
    status = b""
    try:
        with trio.move_on_after(DAEMON_READY_SECONDS):
            status = await ready.receive_some(1)
    finally:
        await ready.aclose()
    if status != b"\0":
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        lines = error_lines(work_dir / log_name)
        detail = "; ".join(lines) if lines else f"exit status {process.returncode}"
        raise LazyPagesError(f"criu lazy-pages did not start: {detail}")
    (work_dir / PIDFILE).write_text(f"{process.pid}\n")
    return process


async def end_daemon(process: trio.Process) -> None:
    """Kill a lazy-pages daemon whose restore failed, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


class LazyMemory:
    """Watches one lazily restored instance until all its memory is back (see the module doc).

    `supervise` runs next to the instance (the runner starts it once the process is adopted);
    `done` is set when it ends, whatever the outcome."""

    def __init__(
        self,
        store: ImageStore,
        image: ImageMeta,
        daemon: trio.Process,
        *,
        work_dir: Path,
        began: float,
        on_complete: Callable[[float], None],
        on_corrupt: Callable[[ImageMeta], None],
    ) -> None:
        self.store = store
        self.image = image
        self.daemon = daemon
        self.work_dir = work_dir
        self.began = began
        self.on_complete = on_complete
        self.on_corrupt = on_corrupt
        self.done = trio.Event()
        self.log = log.bind(program=image.program, image_id=image.id, daemon_pid=daemon.pid)

    async def supervise(self, process: SandboxProcess) -> None:
        verified = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._verify_pages, process, verified, nursery.cancel_scope)
                returncode = await self.daemon.wait()
                if returncode != 0:
                    self._lost(process, returncode)
                    nursery.cancel_scope.cancel()
                    return
                await verified.wait()
            if not verified.is_set():  # a page file did not match: the program was ended
                return
            seconds = time.monotonic() - self.began
            self.log.info("restore_memory_complete", seconds=round(seconds, 3))
            self.on_complete(seconds)
        finally:
            with trio.CancelScope(shield=True):
                await self._reap(process)
            with contextlib.suppress(OSError):
                (self.work_dir / PIDFILE).unlink()
            self.done.set()

    async def _reap(self, process: SandboxProcess) -> None:
        """Wait for the daemon to end (it does once the program is gone or all pages are in);
        one still running after DAEMON_REAP_SECONDS is killed, and the program with it."""
        with trio.move_on_after(DAEMON_REAP_SECONDS):
            await self.daemon.wait()
            return
        _kill(process)
        await end_daemon(self.daemon)

    async def _verify_pages(
        self, process: SandboxProcess, verified: trio.Event, scope: trio.CancelScope
    ) -> None:
        for rel in sorted(r for r in self.image.checksums if is_page_file(r)):
            try:
                await trio.to_thread.run_sync(
                    self.store.verify_file, self.image, rel, abandon_on_cancel=True
                )
            except ImageCorrupt as exc:
                self.log.error("lazy_restore_corrupt", error=str(exc))
                self.on_corrupt(self.image)
                _kill(process)
                with contextlib.suppress(ProcessLookupError):
                    self.daemon.kill()
                scope.cancel()
                return
        verified.set()

    def _lost(self, process: SandboxProcess, returncode: int) -> None:
        how = (
            f"killed by {signal.Signals(-returncode).name}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        # A daemon whose program ended first exits with status 0: this one failed, and the
        # program (if it has not died of missing memory already) must not run on without it.
        lines = error_lines(self.work_dir / lazy_log_name(self.image))
        self.log.error(
            "lazy_pages_failed",
            error=f"criu lazy-pages {how} before all memory was back; the program is "
            "killed and counts as crashed",
            criu_errors=lines,
        )
        _kill(process)


def _kill(process: SandboxProcess) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)


async def wait_for_orphan_daemon(work_dir: Path) -> None:
    """Wait until a lazy-pages daemon left by a previous supervisor for this program has
    served every page (it exits then); bounded by ORPHAN_DAEMON_WAIT_SECONDS."""
    try:
        pid = int((work_dir / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return
    if not _is_lazy_pages_daemon(pid, work_dir):
        return
    log.info("waiting_for_orphan_lazy_pages", work_dir=str(work_dir), daemon_pid=pid)
    with trio.move_on_after(ORPHAN_DAEMON_WAIT_SECONDS):
        while _is_lazy_pages_daemon(pid, work_dir):
            await trio.sleep(0.05)


def _is_lazy_pages_daemon(pid: int, work_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return b"lazy-pages" in cmdline and Path(cwd) == work_dir


LazyCompanion = Callable[[SandboxProcess], Awaitable[None]]
