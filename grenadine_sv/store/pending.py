"""An image on its way into the store (`PendingImage`): a dump CRIU writes, or an image
received from an archive or the object store. It is listed by one rename once every file in
it is durable and sealed, or removed; never listed half-written. At start, what interrupted
dumps and deletes left (`recover_partials`)."""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import structlog
from pydantic import ValidationError

from grenadine_sv import __version__
from grenadine_sv.criu.facts import DumpFacts, ImageFactsError, read_dump_facts
from grenadine_sv.store.definition import META_FORMAT_VERSION
from grenadine_sv.store.durable import (
    fsync_dir,
    make_private_dir,
    write_private_file,
)
from grenadine_sv.store.image_meta import (
    CRIU_SUBDIR,
    DELETING_PREFIX,
    DUMP_STATS_FILE,
    IMAGE_ID_PATTERN,
    INTENT_FILE,
    META_FILE,
    PARTIAL_PREFIX,
    DumpIntent,
    ImageCorrupt,
    ImageMeta,
    current_boot_id,
)
from grenadine_sv.store.sealing import NEW_IMAGE_ALGORITHM, FileRecord, seal_tree
from grenadine_sv.store.snapshot import SnapshotMismatch, check_snapshot, seal_snapshot
from grenadine_sv.store.verification import check_received, verify_files

log = structlog.get_logger(__name__)


@dataclass
class PartialsRecovered:
    """What `recover_partials` did."""

    completed: builtins.list[ImageMeta] = field(default_factory=builtins.list)
    removed: builtins.list[tuple[Path, str]] = field(default_factory=builtins.list)


class PendingImage:
    """A dump in progress: CRIU writes into `criu_dir`, then `commit` publishes it or `abort`
    removes it. As a context manager it aborts on leaving unless committed."""

    def __init__(self, program_dir: Path, program: str, image_id: str, intent: DumpIntent) -> None:
        """Open a partial image made by `create` (or left by a supervisor that died)."""
        self.id = image_id
        self.program = program
        self.intent = intent
        self._program_dir = program_dir
        self._partial_dir = program_dir / f"{PARTIAL_PREFIX}{image_id}"
        self.criu_dir = self._partial_dir / CRIU_SUBDIR
        self._state: Literal["open", "committed", "aborted"] = "open"

    @classmethod
    def create(cls, program_dir: Path, program: str, intent: DumpIntent) -> PendingImage:
        """A new partial image whose intent is on disk before CRIU writes anything."""
        pending = cls(program_dir, program, uuid.uuid4().hex, intent)
        make_private_dir(pending._partial_dir)
        try:
            make_private_dir(pending.criu_dir)
            write_private_file(pending._partial_dir / INTENT_FILE, intent.model_dump_json())
            fsync_dir(pending._partial_dir)
            fsync_dir(program_dir)
        except BaseException:
            pending.abort()
            raise
        return pending

    def commit(
        self,
        facts: DumpFacts | Callable[[], DumpFacts],
        *,
        created: datetime | None = None,
        before_publish: Callable[[ImageMeta], None] | None = None,
    ) -> ImageMeta:
        """Seal the dump: make every file private and durable, write meta.json, call
        `before_publish` with the sealed image (to record what must happen to it, such as an
        upload, before anyone can see it), and publish the image by renaming its directory.
        On failure the partial directory is removed."""
        self._require_open("commit")
        try:
            meta = self.seal(facts, created=created)
            if before_publish is not None:
                before_publish(meta)
        except BaseException:
            self.abort()
            raise
        self.publish(meta)
        return meta

    def seal(
        self, facts: DumpFacts | Callable[[], DumpFacts], *, created: datetime | None = None
    ) -> ImageMeta:
        """Make every file private and durable and write meta.json (replacing one an
        interrupted seal left). The image is not listed yet: `publish` does that. Facts given
        as a function are read while the files are sealed (reading them takes ~10 ms), and
        meta.json is written once every file is hashed, while the fsyncs of the pages may
        still wait on the disk."""
        self._require_open("seal")
        sealed: list[ImageMeta] = []
        with ThreadPoolExecutor(max_workers=1) as reader:
            read = reader.submit(facts) if callable(facts) else None

            def write_meta(records: Mapping[str, FileRecord]) -> None:
                known = read.result() if read is not None else facts
                assert isinstance(known, DumpFacts)
                meta = self._meta(known, records, created)
                meta_path = self._partial_dir / META_FILE
                with contextlib.suppress(FileNotFoundError):
                    meta_path.unlink()
                write_private_file(meta_path, meta.model_dump_json(indent=2))
                sealed.append(meta)

            seal_tree(self.criu_dir, once_hashed=write_meta)
        fsync_dir(self._partial_dir)
        return sealed[0]

    def _meta(
        self, facts: DumpFacts, records: Mapping[str, FileRecord], created: datetime | None
    ) -> ImageMeta:
        intent = self.intent
        return ImageMeta(
            id=self.id,
            program=self.program,
            created=created if created is not None else datetime.now(UTC),
            trigger=intent.trigger,
            comm=facts.comm,
            root_pid=facts.root_pid,
            memory_bytes=facts.memory_bytes,
            image_bytes=sum(r.size for r in records.values()),
            criu_version=intent.criu_version,
            definition_digest=intent.definition_digest,
            stdio_pipes=dict(facts.stdio_pipes),
            dump_stats=dict(facts.dump_stats),
            leave_running=intent.leave_running,
            init=intent.init,
            private_tmp=intent.private_tmp,
            snapshot=list(intent.snapshot),
            snapshot_files=seal_snapshot(self._partial_dir),
            checksums={path: r.digest for path, r in records.items()},
            file_sizes={path: r.size for path, r in records.items()},
            grenadine_version=__version__,
            checksum_algorithm=NEW_IMAGE_ALGORITHM,
            source_pid=intent.source_pid,
            source_start_time=intent.source_start_time,
            format_version=META_FORMAT_VERSION,
            definition=intent.definition,
        )

    def publish(self, meta: ImageMeta) -> None:
        """List the sealed image: one rename, made durable."""
        self._require_open("publish")
        image_dir = self._program_dir / self.id
        os.rename(self._partial_dir, image_dir)
        self._state = "committed"
        fsync_dir(self._program_dir)
        # meta.json says all it said; a crash before this unlink leaves a harmless extra file.
        with contextlib.suppress(FileNotFoundError):
            (image_dir / INTENT_FILE).unlink()
        log.info("image_committed", program=self.program, image_id=self.id, trigger=meta.trigger)

    def publish_received(self, meta: ImageMeta) -> None:
        """Publish files received from elsewhere (an import, a download) under `meta`, which
        must name this image: every file is made private and durable and checked against
        meta's sizes and checksums, then meta.json is written and the directory renamed. On
        failure nothing remains."""
        self._require_open("publish")
        try:
            records = seal_tree(self.criu_dir)
            check_received(meta, self.id, self.program, records, self.criu_dir)
            if meta.records_snapshot:
                try:
                    check_snapshot(self._partial_dir, meta.snapshot_files, sync=True)
                except SnapshotMismatch as exc:
                    raise ImageCorrupt(meta, exc.path, exc.reason) from exc
            write_private_file(self._partial_dir / META_FILE, meta.model_dump_json(indent=2))
            fsync_dir(self._partial_dir)
            os.rename(self._partial_dir, self._program_dir / self.id)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        fsync_dir(self._program_dir)
        log.info("image_received", program=self.program, image_id=self.id)

    def sealed_meta(self) -> ImageMeta | None:
        """The meta.json an interrupted commit wrote completely, or None."""
        path = self._partial_dir / META_FILE
        try:
            meta = ImageMeta.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None
        return meta if meta.id == self.id and meta.program == self.program else None

    def dump_finished(self) -> bool:
        """CRIU completed this dump (it writes its statistics last, on success only)."""
        return (self.criu_dir / DUMP_STATS_FILE).is_file()

    def abort(self) -> None:
        """Remove the partial directory; nothing of this dump remains. Safe to call twice."""
        if self._state == "committed":
            raise RuntimeError(f"image {self.id} of {self.program!r} is committed: delete it")
        self._state = "aborted"
        shutil.rmtree(self._partial_dir, ignore_errors=True)

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"cannot {action} image {self.id}: it is already {self._state}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "open":
            self.abort()


def recover_partials(root: Path, programs: list[str]) -> PartialsRecovered:
    """Deal with what interrupted dumps and deletes left behind. Call it only when no dump
    is in progress (at supervisor start, holding the state_dir lock that CRIU holds too).

    A dump CRIU finished is kept: sealed and listed (its meta.json checked against its
    files when a seal got that far). Only an unfinished dump, one without an intent, one
    from before a reboot that was never made durable, and interrupted deletes are removed.
    """
    recovered = PartialsRecovered()
    for program in programs:
        program_dir = root / program
        for entry in sorted(program_dir.iterdir()):
            if entry.name.startswith(DELETING_PREFIX):
                _remove_entry(entry)
                recovered.removed.append((entry, "an interrupted delete"))
            elif entry.name.startswith(PARTIAL_PREFIX):
                image = _recover_partial(program_dir, program, entry)
                if isinstance(image, ImageMeta):
                    recovered.completed.append(image)
                else:
                    _remove_entry(entry)
                    recovered.removed.append((entry, image))
    for image in recovered.completed:
        log.warning("interrupted_dump_completed", program=image.program, image_id=image.id)
    for path, why in recovered.removed:
        log.warning("stale_partial_removed", path=str(path), reason=why)
    return recovered


def _recover_partial(program_dir: Path, program: str, entry: Path) -> ImageMeta | str:
    """The image an interrupted dump becomes, or why it cannot be kept."""
    image_id = entry.name.removeprefix(PARTIAL_PREFIX)
    if not IMAGE_ID_PATTERN.fullmatch(image_id) or entry.is_symlink() or not entry.is_dir():
        return "not a dump directory"
    try:
        intent = DumpIntent.model_validate_json((entry / INTENT_FILE).read_bytes())
    except (OSError, ValidationError):
        return "no intent.json: the dump had not begun"
    pending = PendingImage(program_dir, program, image_id, intent)
    sealed = pending.sealed_meta()
    if sealed is not None:
        try:
            verify_files(sealed, pending.criu_dir)
        except ImageCorrupt:
            sealed = None  # files changed since: seal again below if CRIU finished
    if sealed is None:
        if not pending.dump_finished():
            return "CRIU had not finished the dump"
        if intent.boot_id != current_boot_id():
            return "the dump was never made durable and the machine has rebooted since"
        try:
            facts = read_dump_facts(pending.criu_dir, under_init=intent.init)
            sealed = pending.seal(facts)
        except (ImageFactsError, OSError, ValueError) as exc:
            return f"the finished dump cannot be sealed: {exc}"
    pending.publish(sealed)
    return sealed


def _remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
