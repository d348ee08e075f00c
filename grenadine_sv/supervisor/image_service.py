"""What checkpoints and restores of a program share: its lock and last images
(`ProgramImages`), the image store, the metrics, retention that spares images in use, and
CRIU's options for the program. `restores.Restores` and `checkpoints.CheckpointService`
build on `ImageService`."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.criu.client import (
    Criu,
    CriuError,
)
from grenadine_sv.criu.options import CriuOptions, NetworkLocks, probe_network_locks
from grenadine_sv.sandbox import SandboxError
from grenadine_sv.store.images import (
    ImageMeta,
    ImageStore,
    Trigger,
)
from grenadine_sv.supervisor.lazy import (
    LazyMemory,
)

if TYPE_CHECKING:  # the object store's code is loaded only when one is configured
    from grenadine_sv.supervisor.remote import RemoteImages

log = structlog.get_logger()


class CheckpointError(Exception):
    """A checkpoint did not happen; the program is as it was and no image was kept."""


class RestoreError(SandboxError):
    """A restore did not happen; the message says why."""


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
    """A program's last failed checkpoint: when, why it was taken, what went wrong."""

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


class ImageService:
    """The state shared by a program's checkpoints and restores."""

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
        # Lazy restores run CRIU one at a time (see Restores.launch_from_image).
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

    def remove_image(self, image: ImageMeta) -> None:
        """Delete one image (and its restore log), whatever its place in the retention."""
        self.store.delete(image)
        with contextlib.suppress(FileNotFoundError):
            (self.work_dir / image.program / restore_log_name(image)).unlink()
        if self.images_of(image.program).last_checkpoint == image:
            self.learn_last_checkpoint(image.program)

    def prune_images(
        self, program: str, keep: int, *, files_later: bool = False
    ) -> list[ImageMeta]:
        """Apply retention to `program`'s images, with the restore logs of those deleted
        (`files_later`: the images' files are left for the store's remove_deleted_files)."""
        in_use = set(self._in_use)
        if self.remote is not None:
            in_use |= self.remote.pinned(program)
        serving = self.images_of(program).serving_image_id()
        if serving is not None:
            in_use.add(serving)
        deleted = self.store.prune(program, keep, in_use=in_use, files_later=files_later)
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


def restore_log_name(image: ImageMeta) -> str:
    return f"restore-{image.id}.log"
