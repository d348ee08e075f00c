"""Images in the object store: queued uploads that survive a restart, remote retention, and
downloads for restores. Built only when [supervisor.remote] url is set.

The upload queue lives in state_dir/upload-queue.json (0600, replaced atomically): an image
sealed locally is queued before the checkpoint returns, uploaded by one background task with
exponential backoff (each upload its own; one that succeeds ends the wait of the others), and
never pruned locally while it waits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import structlog
import trio

from grenadine_sv.config.models import ProgramConfig, RemoteSettings
from grenadine_sv.store.archive import ArchiveRefused, ArchiveStream, acceptance, read_archive
from grenadine_sv.store.definition import CurrentDefinition
from grenadine_sv.store.encryption import EncryptionKeyError, load_identities, parse_recipients
from grenadine_sv.store.images import ImageMeta, ImageNotFound, ImageStore
from grenadine_sv.store.remote import (
    RemoteImage,
    RemoteImageNotFound,
    RemoteSettingsLike,
    RemoteStore,
    RemoteStoreError,
)
from grenadine_sv.supervisor.remote_refs import REMOTE_PREFIX, RemoteUnavailable

log = structlog.get_logger()

QUEUE_FILE = "upload-queue.json"
DOWNLOADS_SUBDIR = "downloads"
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0


class RemoteMetrics(Protocol):
    def upload_succeeded(self, program: str, duration_seconds: float) -> None: ...

    def upload_failed(self, program: str) -> None: ...

    def upload_queue_changed(self, length: int) -> None: ...

    def remote_images_seen(self, program: str, count: int) -> None: ...

    def download_succeeded(self, program: str, duration_seconds: float) -> None: ...

    def download_failed(self, program: str) -> None: ...


class NoRemoteMetrics:
    def upload_succeeded(self, program: str, duration_seconds: float) -> None:
        pass

    def upload_failed(self, program: str) -> None:
        pass

    def upload_queue_changed(self, length: int) -> None:
        pass

    def remote_images_seen(self, program: str, count: int) -> None:
        pass

    def download_succeeded(self, program: str, duration_seconds: float) -> None:
        pass

    def download_failed(self, program: str) -> None:
        pass


@dataclass
class QueuedUpload:
    program: str
    image_id: str
    attempts: int = 0
    not_before: float = 0.0
    """Unix time of the next attempt."""
    last_error: str | None = None


def backoff_seconds(attempts: int) -> float:
    """Wait before attempt `attempts + 1`: 1 s, 2 s, 4 s ... at most BACKOFF_MAX_SECONDS."""
    if attempts <= 0:
        return 0.0
    delay: float = BACKOFF_FIRST_SECONDS * 2 ** (attempts - 1)
    return min(delay, BACKOFF_MAX_SECONDS)


class UploadQueue:
    """The persisted list of images waiting for upload, oldest first. Checkpoints (in worker
    threads) add to it while the uploader removes from it: every change and save holds a lock,
    so the file always holds a whole list."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / QUEUE_FILE
        self.entries: list[QueuedUpload] = []
        self._lock = threading.RLock()

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.entries = [QueuedUpload(**entry) for entry in raw["uploads"]]
        except FileNotFoundError:
            self.entries = []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("upload_queue_unreadable", path=str(self.path), error=str(exc))
            self.entries = []

    def save(self) -> None:
        with self._lock:
            temporary = self.path.with_name(f".{QUEUE_FILE}.tmp")
            data = json.dumps({"uploads": [asdict(e) for e in self.entries]}, indent=2)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(data)
                file.flush()
                os.fsync(fd)
            os.rename(temporary, self.path)

    def add(self, program: str, image_id: str) -> bool:
        with self._lock:
            if any(e.program == program and e.image_id == image_id for e in self.entries):
                return False
            self.entries = [*self.entries, QueuedUpload(program, image_id)]
            return True

    def remove(self, entry: QueuedUpload) -> None:
        with self._lock:
            self.entries = [e for e in self.entries if e is not entry]

    def make_due(self, now: float) -> None:
        """Retry every waiting upload at once: the store just took one, so the outage their
        backoff waits out is over (a failure of their own backs off again from where it was)."""
        with self._lock:
            for entry in self.entries:
                entry.not_before = min(entry.not_before, now)

    def ids_of(self, program: str) -> set[str]:
        with self._lock:
            return {e.image_id for e in self.entries if e.program == program}


class RemoteImages:
    def __init__(
        self,
        settings: RemoteSettings,
        store: ImageStore,
        programs: Callable[[], Mapping[str, ProgramConfig]],
        definition_of: Callable[[ProgramConfig], CurrentDefinition],
        *,
        metrics: RemoteMetrics | None = None,
        store_factory: Callable[[RemoteSettingsLike], RemoteStore] = RemoteStore,
    ) -> None:
        assert settings.url is not None
        self.settings = settings
        self.store = store
        self.programs = programs
        self.definition_of = definition_of
        self.metrics: RemoteMetrics = metrics or NoRemoteMetrics()
        self.queue = UploadQueue(store.state_dir)
        encryption = settings.encryption
        self.recipients = parse_recipients(encryption.recipients)
        self.identities = (
            load_identities(encryption.identity_file)
            if encryption.identity_file is not None
            else None
        )
        self._store_factory = store_factory
        self._remote: RemoteStore | None = None
        self._wake = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.clock: Callable[[], float] = time.time

    # the queue -------------------------------------------------------------------

    def load_queue(self, completed: Sequence[ImageMeta] = ()) -> None:
        """Read the queue a previous supervisor left; drop images no longer on disk, and
        queue those of `completed` (dumps a killed supervisor left sealing, listed at this
        start) whose program uploads: it may have been killed before it queued them."""
        self.queue.load()
        programs = self.programs()
        for image in completed:
            config = programs.get(image.program)
            uploads = config is not None and config.checkpoint.upload
            if uploads and self.queue.add(image.program, image.id):
                log.info("upload_queued", program=image.program, image_id=image.id)
        present = {(m.program, m.id) for m in self.store.list()}
        for entry in list(self.queue.entries):
            if (entry.program, entry.image_id) not in present:
                log.warning(
                    "upload_dropped",
                    program=entry.program,
                    image_id=entry.image_id,
                    reason="the image is no longer on this host",
                )
                self.queue.remove(entry)
        self.queue.save()
        self.metrics.upload_queue_changed(len(self.queue.entries))
        if self.queue.entries:
            log.info("upload_queue_resumed", waiting=len(self.queue.entries))

    def pinned(self, program: str) -> set[str]:
        """Ids of the program's images waiting for upload (local pruning keeps them)."""
        return self.queue.ids_of(program)

    def image_sealed(self, config: ProgramConfig, image: ImageMeta) -> None:
        """Queue a new image for upload when its program asks for it (blocks on a write:
        call it from a worker thread)."""
        if not config.checkpoint.upload:
            return
        if self.queue.add(image.program, image.id):
            self.queue.save()
            log.info("upload_queued", program=image.program, image_id=image.id)
        self.metrics.upload_queue_changed(len(self.queue.entries))
        self._wake_from_thread()

    def wake(self) -> None:
        self._wake.set()

    def _wake_from_thread(self) -> None:
        """Wake the uploader from a worker thread (a dump queues its image there, whichever
        task asked for it: a checkpoint, a take-back, a restore's first checkpoint)."""
        token = self._trio_token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.wake)

    async def run_uploads(self) -> None:
        """Upload queued images one at a time, oldest first, until cancelled."""
        self._trio_token = trio.lowlevel.current_trio_token()
        while True:
            self._wake = trio.Event()
            now = self.clock()
            due = [e for e in self.queue.entries if e.not_before <= now]
            if not due:
                later = [e.not_before for e in self.queue.entries]
                wait = min(later) - now if later else math.inf
                with trio.move_on_after(wait):
                    await self._wake.wait()
                continue
            await self._upload(due[0])

    async def _upload(self, entry: QueuedUpload) -> None:
        bound = log.bind(program=entry.program, image_id=entry.image_id)
        began = time.monotonic()
        try:
            remote_count = await trio.to_thread.run_sync(self._upload_blocking, entry)
        except ImageNotFound:
            if await trio.to_thread.run_sync(self._listed_soon, entry):
                # Queued while sealed, before it is listed: it is, or will be in a moment.
                entry.not_before = self.clock() + BACKOFF_FIRST_SECONDS / 10
                return
            bound.warning("upload_dropped", reason="the image is no longer on this host")
            self.queue.remove(entry)
        except (RemoteStoreError, OSError, ArchiveRefused, EncryptionKeyError) as exc:
            entry.attempts += 1
            delay = backoff_seconds(entry.attempts)
            entry.not_before = self.clock() + delay
            entry.last_error = str(exc)
            self.metrics.upload_failed(entry.program)
            bound.warning(
                "upload_failed", attempts=entry.attempts, retry_in_seconds=delay, error=str(exc)
            )
        else:
            self.queue.remove(entry)
            self.queue.make_due(self.clock())
            duration = time.monotonic() - began
            self.metrics.upload_succeeded(entry.program, duration)
            if remote_count is not None:
                self.metrics.remote_images_seen(entry.program, remote_count)
            bound.info("upload_done", duration_seconds=round(duration, 3))
        await trio.to_thread.run_sync(self.queue.save)
        self.metrics.upload_queue_changed(len(self.queue.entries))

    def _upload_blocking(self, entry: QueuedUpload) -> int | None:
        """Stream the image's encrypted archive into the store; then apply remote_keep.
        Returns how many images of the program the store holds, when it was listed."""
        image = self.store.resolve(entry.program, entry.image_id)
        remote = self.remote()
        with ArchiveStream(self.store, image, self.recipients) as stream:
            remote.upload(image, stream.reader)
            try:
                stream.finish()
            except BaseException:
                # The object holds a cut-off archive (the image went away while it was read).
                with contextlib.suppress(RemoteStoreError):
                    remote.delete(
                        RemoteImage(
                            image.program,
                            image.id,
                            image.created,
                            "",
                            0,
                            remote.key(image.program, image.id),
                        )
                    )
                raise
        config = self.programs().get(entry.program)
        keep = config.checkpoint.remote_keep if config is not None else None
        if keep is None:
            return None
        images = remote.list(entry.program)
        for old in images[keep:]:
            remote.delete(old)
            log.info("remote_image_pruned", program=entry.program, image_id=old.id)
        return min(len(images), keep)

    def _listed_soon(self, entry: QueuedUpload) -> bool:
        """The entry's image is being sealed, or was listed since it was looked for (its
        partial directory is looked at first: publishing renames it into the listing)."""
        if self.store.being_made(entry.program, entry.image_id):
            return True
        try:
            self.store.resolve(entry.program, entry.image_id)
        except ImageNotFound:
            return False
        return True

    def remote(self) -> RemoteStore:
        """The store client, built on first use (in a worker thread: it imports boto3)."""
        if self._remote is None:
            url = self.settings.url
            assert url is not None
            self._remote = self._store_factory(
                RemoteSettingsLike(
                    url=url,
                    endpoint=self.settings.endpoint,
                    region=self.settings.region,
                    credentials_file=self.settings.credentials_file,
                )
            )
        return self._remote

    # downloads -------------------------------------------------------------------

    async def list_remote(self, program: str) -> list[RemoteImage]:
        images = await trio.to_thread.run_sync(lambda: self.remote().list(program))
        self.metrics.remote_images_seen(program, len(images))
        return images

    async def fetch(
        self, config: ProgramConfig, ref: str, *, allow_changed_definition: bool = False
    ) -> ImageMeta:
        """The local copy of the program's remote image `ref` ("latest", an id or a prefix),
        downloaded, decrypted and verified first unless this host has it already."""
        began = time.monotonic()
        try:
            image = await trio.to_thread.run_sync(
                self._fetch_blocking, config, ref, allow_changed_definition
            )
        except (RemoteStoreError, RemoteImageNotFound, ArchiveRefused, OSError) as exc:
            self.metrics.download_failed(config.name)
            log.error("download_failed", program=config.name, ref=ref, error=str(exc))
            raise RemoteUnavailable(f"remote image {ref!r} of {config.name}: {exc}") from exc
        self.metrics.download_succeeded(config.name, time.monotonic() - began)
        return image

    def _fetch_blocking(self, config: ProgramConfig, ref: str, allow_changed: bool) -> ImageMeta:
        self.store.check_trusted()
        remote = self.remote()
        chosen = remote.resolve(config.name, ref)
        with contextlib.suppress(ImageNotFound):
            return self.store.resolve(config.name, chosen.id)
        if self.identities is None:
            raise ArchiveRefused(
                "no [supervisor.remote.encryption] identity_file is configured to decrypt it"
            )
        downloads = self.store.state_dir / DOWNLOADS_SUBDIR
        downloads.mkdir(mode=0o700, exist_ok=True)
        spool = downloads / f"{chosen.id}.partial"
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w+b", buffering=1 << 20) as file:
                remote.download(chosen, file)
                file.seek(0)
                meta = read_archive(
                    self.store,
                    file,
                    identities=self.identities,
                    accept=acceptance(
                        lambda name: self.definition_of(config) if name == config.name else None,
                        "this configuration",
                        allow_changed,
                    ),
                )
        finally:
            with contextlib.suppress(FileNotFoundError):
                spool.unlink()
        log.info("image_downloaded", program=config.name, image_id=meta.id, bytes=chosen.size)
        return meta

    def remove_stale_downloads(self) -> None:
        downloads = self.store.state_dir / DOWNLOADS_SUBDIR
        if downloads.is_dir():
            for leftover in downloads.iterdir():
                leftover.unlink()

    async def resolve_pinned(
        self, config: ProgramConfig, ref: str, *, allow_changed_definition: bool = False
    ) -> ImageMeta:
        """The image a pinned `restore = ref` means under the program's restore_source."""
        source = config.restore_source
        if ref.startswith(REMOTE_PREFIX):
            return await self.fetch(
                config,
                ref.removeprefix(REMOTE_PREFIX),
                allow_changed_definition=allow_changed_definition,
            )
        if ref != "latest" or source == "local":
            return await trio.to_thread.run_sync(self.store.resolve, config.name, ref)
        if source == "remote":
            return await self.fetch(config, "latest")
        local = await trio.to_thread.run_sync(self.store.list, config.name)
        try:
            remote = await self.list_remote(config.name)
        except RemoteStoreError as exc:
            if not local:
                raise RemoteUnavailable(str(exc)) from exc
            log.warning("remote_unavailable_using_local", program=config.name, error=str(exc))
            remote = []
        if remote and (not local or remote[0].created > local[0].created):
            return await self.fetch(config, remote[0].id)
        if not local:
            raise ImageNotFound(f"program {config.name!r} has no images, here or remotely")
        return local[0]
