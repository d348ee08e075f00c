"""The image store: where checkpoints live on disk, and how they appear and disappear atomically.

Layout (the README, "Images")::

    {state_dir}/images/{program}/{image_id}/meta.json
    {state_dir}/images/{program}/{image_id}/criu/         CRIU's files
    {state_dir}/images/{program}/.partial-{image_id}/     while dumping and sealing
    {state_dir}/images/{program}/.partial-{image_id}/intent.json   what the dump is for
    {state_dir}/images/{program}/.deleting-{image_id}/    while deleting

An image is listed only once its directory has its final name, and it gets that name by one
`rename` after every file in it is on disk. Anything whose name starts with "." is never listed,
so an interrupted dump or delete never shows up as an image. `intent.json` is written (and
fsynced) before CRIU runs: when the supervisor dies after CRIU finished a dump but before the
image was listed, `recover_partials` at the next start seals and lists that dump instead of
throwing it away, and removes only what is incomplete.

Everything here blocks on disk I/O: the supervisor calls it through `trio.to_thread`.

Longer than most modules (about 800 lines): the layout, the atomic writes, the recovery of
interrupted dumps and the reads are one on-disk contract, kept in one place; sealing
(sealing.py) and the recorded definitions (definition.py) are already apart.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from grenadine_sv import __version__
from grenadine_sv.config.units import check_program_name
from grenadine_sv.criu.facts import DumpFacts, ImageFactsError, read_dump_facts
from grenadine_sv.store.definition import (
    META_FORMAT_VERSION,
    SNAPSHOT_FORMAT_VERSION,
    RecordedDefinition,
)
from grenadine_sv.store.durable import (
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    make_private_dir,
    write_private_file,
)
from grenadine_sv.store.sealing import (
    NEW_IMAGE_ALGORITHM,
    SEAL_WORKERS,
    ChecksumAlgorithm,
    DumpWatcher,
    FileRecord,
    digest_of,
    seal_tree,
    walk_tree,
)
from grenadine_sv.store.snapshot import (
    SnapshotEntry,
    SnapshotMismatch,
    check_snapshot,
    seal_snapshot,
)
from grenadine_sv.store.trust import check_trusted_dir

Trigger = Literal[
    "signal", "interval", "pre-deploy", "manual", "recovery", "pre-restore", "shutdown"
]

IMAGES_SUBDIR = "images"
META_FILE = "meta.json"
CRIU_SUBDIR = "criu"
INTENT_FILE = "intent.json"
# CRIU writes it last, after the dump succeeded and the tasks reached their final state.
DUMP_STATS_FILE = "stats-dump"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
# Written into an image's directory when a restore finds it corrupt; `images` shows it.
CORRUPT_MARK = "CORRUPT"
MIN_PREFIX_LEN = 4

_IMAGE_ID = re.compile(r"[0-9a-f]{32}")
_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9a-f]+")

log = structlog.get_logger(__name__)


def validate_program_name(program: str) -> str:
    """Return `program` if it can name a directory under the store (the configuration's
    rule for program names), else raise ValueError."""
    try:
        return check_program_name(program)
    except ValueError as exc:
        raise ValueError(
            f"program name {program!r} cannot name an image directory: {exc}"
        ) from None


def validate_image_id(image_id: str) -> str:
    """Return `image_id` if it is 32 lowercase hex digits (uuid4().hex), else raise ValueError."""
    if not _IMAGE_ID.fullmatch(image_id):
        raise ValueError(
            f"image id {image_id!r} is not valid: it must be 32 lowercase hexadecimal digits"
        )
    return image_id


def current_boot_id() -> str:
    return BOOT_ID_PATH.read_text().strip()


class DumpIntent(BaseModel):
    """What a dump is for, written before CRIU runs: enough to seal and list it later."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trigger: Trigger
    criu_version: str
    definition_digest: str
    leave_running: bool
    source_pid: int
    """Host pid of the dumped root (the sandbox's PID 1)."""
    source_start_time: int
    """Its start time in clock ticks since boot: with source_pid, names the very instance."""
    boot_id: str
    """Unsealed files of a dump from before a reboot may be torn: such a dump is not kept."""
    definition: RecordedDefinition | None = None
    init: bool = False
    """The root is the sandbox's init (tini), the program its child."""
    private_tmp: bool = False
    """The program's /tmp is recorded as an external mount named for it (not by host path)."""
    snapshot: list[str] = []
    """Program paths whose files the image holds a copy of (files/, see store/snapshot.py)."""


class ImageMeta(BaseModel):
    """What meta.json records about one image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    program: str
    created: datetime
    trigger: Trigger
    comm: str
    root_pid: int
    memory_bytes: int
    image_bytes: int
    criu_version: str
    definition_digest: str
    stdio_pipes: dict[str, int]
    dump_stats: dict[str, int]
    leave_running: bool
    init: bool = False
    """The root is the sandbox's init (tini), the program its child."""
    private_tmp: bool = False
    """The program's /tmp is recorded as an external mount named for it (not by host path)."""
    snapshot: list[str] = []
    """Program paths whose files the image holds a copy of (files/, see store/snapshot.py)."""
    snapshot_files: dict[str, SnapshotEntry] = {}
    """Relative path under files/ -> what it is (format_version 3 on; see store/snapshot.py)."""
    checksums: dict[str, str]
    """Relative path under criu/ -> hex digest (`checksum_algorithm`)."""
    file_sizes: dict[str, int]
    """Relative path under criu/ -> size in bytes (lets `verify` name a truncation cheaply)."""
    grenadine_version: str
    checksum_algorithm: ChecksumAlgorithm = "sha256"
    """Images before BLAKE3 have no such key: their digests are SHA-256."""
    source_pid: int | None = None
    """Host pid of the instance dumped (None in images made before it was recorded)."""
    source_start_time: int | None = None
    format_version: int = 1
    """1: images that record only definition_digest; 2: also `definition`; 3: also
    `snapshot_files`."""
    definition: RecordedDefinition | None = None
    """The program's definition when the image was taken (see store/definition.py)."""

    @property
    def records_snapshot(self) -> bool:
        """meta.json records the files/ of the image (older images have them unrecorded)."""
        return self.format_version >= SNAPSHOT_FORMAT_VERSION

    def froze(self, pid: int, start_time: int) -> bool:
        """True when this image was taken of that very instance, which the dump left frozen
        (a checkpoint that stops the program)."""
        return (
            not self.leave_running
            and self.source_pid == pid
            and self.source_start_time == start_time
        )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return validate_image_id(value)

    @field_validator("program")
    @classmethod
    def _check_program(cls, value: str) -> str:
        return validate_program_name(value)

    @field_validator("created")
    @classmethod
    def _check_created(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created must carry a time zone (it is stored in UTC)")
        return value.astimezone(UTC)


class ImageNotFound(LookupError):
    """No image of a program matches a reference."""


class AmbiguousImage(LookupError):
    """A reference matches more than one image of a program."""


class ImageCorrupt(Exception):
    """An image's files do not match the checksums recorded when it was made."""

    def __init__(self, image: ImageMeta, path: str, reason: str) -> None:
        super().__init__(
            f"image {image.id} of program {image.program!r} is corrupt: {path} {reason}; "
            f"remove it (grenadine-sv rmi {image.program} {image.id[:12]}) "
            "or restore another image"
        )
        self.image = image
        self.path = path
        self.reason = reason


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
        self._watcher: DumpWatcher | None = None
        self._sync_pool: ThreadPoolExecutor | None = None

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

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around the dump: hash and sync CRIU's files while it writes them, so that `commit`
        has little left to do. Leave it only once CRIU has exited (every file closed)."""
        self._require_open("watch")
        self._sync_pool = ThreadPoolExecutor(max_workers=SEAL_WORKERS)
        with DumpWatcher(self.criu_dir, self._sync_pool) as watcher:
            self._watcher = watcher
            yield

    def commit(
        self,
        facts: DumpFacts,
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

    def seal(self, facts: DumpFacts, *, created: datetime | None = None) -> ImageMeta:
        """Make every file private and durable and write meta.json (replacing one an
        interrupted seal left). The image is not listed yet: `publish` does that."""
        self._require_open("seal")
        intent = self.intent
        try:
            records = seal_tree(self.criu_dir, self._watcher)
        finally:
            self._release_watcher()
        meta = ImageMeta(
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
        meta_path = self._partial_dir / META_FILE
        with contextlib.suppress(FileNotFoundError):
            meta_path.unlink()
        write_private_file(meta_path, meta.model_dump_json(indent=2))
        fsync_dir(self._partial_dir)
        return meta

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
            _check_received(meta, self.id, self.program, records, self.criu_dir)
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
        self._release_watcher()
        shutil.rmtree(self._partial_dir, ignore_errors=True)

    def _release_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.close_files()
            self._watcher = None
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None

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


class ImageStore:
    """Images of every program under `{state_dir}/images`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / IMAGES_SUBDIR

    def begin_import(self, meta: ImageMeta) -> PendingImage:
        """Start receiving the image `meta` describes (an import or a download); raises
        FileExistsError when this store already has it or is receiving it. No intent is
        written: a supervisor that dies meanwhile leaves a partial that start-up removes."""
        program_dir = self._program_dir(meta.program)
        if not self.state_dir.is_dir():
            self.state_dir.mkdir(mode=DIR_MODE, parents=True)
        self._ensure_dir(self.root)
        self._ensure_dir(program_dir)
        if (program_dir / meta.id).exists():
            raise FileExistsError(
                f"program {meta.program!r} already has image {meta.id} on this host"
            )
        intent = DumpIntent(
            trigger=meta.trigger,
            criu_version=meta.criu_version,
            definition_digest=meta.definition_digest,
            leave_running=meta.leave_running,
            source_pid=meta.source_pid or 0,
            source_start_time=meta.source_start_time or 0,
            boot_id="",
            definition=meta.definition,
            init=meta.init,
        )
        pending = PendingImage(program_dir, meta.program, validate_image_id(meta.id), intent)
        try:
            make_private_dir(pending._partial_dir)
        except FileExistsError:
            raise FileExistsError(
                f"image {meta.id} of program {meta.program!r} is being received already"
            ) from None
        make_private_dir(pending.criu_dir)
        return pending

    def begin(self, program: str, intent: DumpIntent) -> PendingImage:
        """Start a dump of `program`: CRIU writes into the returned image's `criu_dir`.
        Raise UntrustedPath when another user could reach state_dir (store/trust.py)."""
        program_dir = self._program_dir(program)
        if not self.state_dir.is_dir():
            self.state_dir.mkdir(mode=DIR_MODE, parents=True)
        self.check_trusted()
        self._ensure_dir(self.root)
        self._ensure_dir(program_dir)
        return PendingImage.create(program_dir, program, intent)

    def check_trusted(self) -> None:
        """Raise UntrustedPath unless state_dir and every directory above it are trusted."""
        check_trusted_dir(self.state_dir, what="state_dir")

    def list(self, program: str | None = None) -> list[ImageMeta]:
        """Images newest first (IDX 0 is the newest); with no program, all programs in name
        order, each newest first. Directories without a valid meta.json are skipped."""
        programs = [program] if program is not None else self.programs()
        images: list[ImageMeta] = []
        for name in programs:
            found = list(self._read_program(name))
            found.sort(key=lambda m: (m.created, m.id), reverse=True)
            images.extend(found)
        return images

    def resolve(self, program: str, ref: str) -> ImageMeta:
        """The one image of `program` that `ref` names: a full id, a unique id prefix of at
        least 4 characters, an IDX from `list(program)`, or "latest"."""
        images = self.list(program)
        if not images:
            raise ImageNotFound(f"program {program!r} has no images")
        ref = ref.strip().lower()
        if ref == "latest":
            return images[0]
        matches = _match_ref(images, ref)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(m.id for m in matches)
            raise AmbiguousImage(
                f"image reference {ref!r} of program {program!r} matches {len(matches)} "
                f"images ({ids}); give more characters of the id"
            )
        hint = ""
        if _HEX.fullmatch(ref) and len(ref) < MIN_PREFIX_LEN and not _DECIMAL.fullmatch(ref):
            hint = f" (an id prefix needs at least {MIN_PREFIX_LEN} characters)"
        raise ImageNotFound(
            f"program {program!r} has no image {ref!r}{hint}; it has {len(images)} "
            f"(IDX 0 to {len(images) - 1}, see `grenadine-sv images {program}`)"
        )

    def criu_dir(self, image: ImageMeta) -> Path:
        """Where CRIU's files of `image` are (to restore from)."""
        return self._image_dir(image) / CRIU_SUBDIR

    def mark_corrupt(self, image: ImageMeta, reason: str) -> None:
        """Remember that `image` failed its check, so that `images` marks it."""
        mark = self._image_dir(image) / CORRUPT_MARK
        try:
            fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(reason + "\n")
        except OSError as exc:
            log.warning("corrupt_mark_not_written", image_id=image.id, error=str(exc))

    def corruption(self, image: ImageMeta) -> str | None:
        """Why `image` cannot be restored, from what is cheap to know: the mark a failed
        restore left, or a file missing or resized (no hashing; `verify` does that)."""
        try:
            return (self._image_dir(image) / CORRUPT_MARK).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            return f"{CORRUPT_MARK} mark unreadable: {exc}"
        try:
            self._check_files(image, self.criu_dir(image))
        except ImageCorrupt as exc:
            return f"{exc.path} {exc.reason}"
        return None

    def verify(self, image: ImageMeta, *, skip: Callable[[str], bool] | None = None) -> None:
        """Check every file of `image` against its recorded size and digest; raise ImageCorrupt
        naming the first file that is missing, extra, resized or altered. Files for which
        `skip` is true get the cheap checks only (a lazy restore hashes them as it serves)."""
        self._verify_files(image, self.criu_dir(image), skip)
        if image.records_snapshot:
            try:
                check_snapshot(self._image_dir(image), image.snapshot_files)
            except SnapshotMismatch as exc:
                raise ImageCorrupt(image, exc.path, exc.reason) from exc

    def _check_files(self, image: ImageMeta, criu_dir: Path) -> None:
        """Every file of `image` present, regular and of its recorded size, and no other."""
        if not criu_dir.is_dir():
            raise ImageCorrupt(image, f"{CRIU_SUBDIR}/", "is missing")
        present = dict(walk_tree(criu_dir)[0])
        # Cheap checks on every file first, so a truncated image fails before any hashing.
        for rel in sorted(image.checksums):
            path = present.pop(rel, None)
            if path is None:
                raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", "is missing")
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", "is not a regular file")
            if st.st_uid != os.geteuid():
                raise ImageCorrupt(
                    image,
                    f"{CRIU_SUBDIR}/{rel}",
                    f"is owned by uid {st.st_uid}, not by the supervisor's user",
                )
            expected_size = image.file_sizes.get(rel, st.st_size)
            if st.st_size != expected_size:
                raise ImageCorrupt(
                    image,
                    f"{CRIU_SUBDIR}/{rel}",
                    f"has {st.st_size} bytes, expected {expected_size}",
                )
        if present:
            raise ImageCorrupt(
                image,
                f"{CRIU_SUBDIR}/{min(present)}",
                "was not part of the dump (is CRIU's work dir for restores inside the image?)",
            )

    def _verify_files(
        self, image: ImageMeta, criu_dir: Path, skip: Callable[[str], bool] | None = None
    ) -> None:
        self._check_files(image, criu_dir)
        for rel in sorted(image.checksums):
            if skip is None or not skip(rel):
                self.verify_file(image, rel, criu_dir)

    def verify_file(self, image: ImageMeta, rel: str, criu_dir: Path | None = None) -> None:
        """Hash one file of `image` and raise ImageCorrupt if it does not match."""
        top = criu_dir if criu_dir is not None else self.criu_dir(image)
        try:
            digest = digest_of(top / rel, image.checksum_algorithm)
        except (OSError, ValueError) as exc:
            raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", f"cannot be read ({exc})") from exc
        if digest != image.checksums[rel]:
            raise ImageCorrupt(
                image,
                f"{CRIU_SUBDIR}/{rel}",
                f"does not match its {image.checksum_algorithm} checksum",
            )

    def delete(self, image: ImageMeta) -> None:
        """Remove `image`: first unlisted by one rename, then its files."""
        program_dir = self._program_dir(image.program)
        doomed = program_dir / f"{DELETING_PREFIX}{validate_image_id(image.id)}"
        try:
            os.rename(program_dir / image.id, doomed)
        except FileNotFoundError:
            raise ImageNotFound(
                f"program {image.program!r} has no image {image.id} (already deleted?)"
            ) from None
        fsync_dir(program_dir)
        shutil.rmtree(doomed)
        log.info("image_deleted", program=image.program, image_id=image.id)

    def prune(
        self, program: str, keep: int, in_use: Collection[str] = ()
    ) -> builtins.list[ImageMeta]:
        """Delete all but the `keep` newest images of `program`, and return the deleted ones.

        The newest pre-deploy image is never deleted and does not count against `keep`: it is
        what a rollback restores, however many checkpoints were taken since the deploy. Images
        whose id is in `in_use` (a restore of them is under way, or a lazy restore still serves
        memory from them) are not deleted either.
        """
        doomed = self.prune_plan(self.list(program), keep, in_use)
        for image in doomed:
            self.delete(image)
        return doomed

    @staticmethod
    def prune_plan(
        images: builtins.list[ImageMeta], keep: int, in_use: Collection[str] = ()
    ) -> builtins.list[ImageMeta]:
        """Which of `images` (newest first) `prune(program, keep, in_use)` deletes."""
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}")
        protected = next((m for m in images if m.trigger == "pre-deploy"), None)
        candidates = [m for m in images if m is not protected and m.id not in in_use]
        return candidates[keep:]

    def recover_partials(self) -> PartialsRecovered:
        """Deal with what interrupted dumps and deletes left behind. Call it only when no dump
        is in progress (at supervisor start, holding the state_dir lock that CRIU holds too).

        A dump CRIU finished is kept: sealed and listed (its meta.json checked against its
        files when a seal got that far). Only an unfinished dump, one without an intent, one
        from before a reboot that was never made durable, and interrupted deletes are removed.
        """
        recovered = PartialsRecovered()
        for program in self.programs():
            program_dir = self.root / program
            for entry in sorted(program_dir.iterdir()):
                if entry.name.startswith(DELETING_PREFIX):
                    _remove_entry(entry)
                    recovered.removed.append((entry, "an interrupted delete"))
                elif entry.name.startswith(PARTIAL_PREFIX):
                    image = self._recover_partial(program_dir, program, entry)
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

    def _recover_partial(self, program_dir: Path, program: str, entry: Path) -> ImageMeta | str:
        """The image an interrupted dump becomes, or why it cannot be kept."""
        image_id = entry.name.removeprefix(PARTIAL_PREFIX)
        if not _IMAGE_ID.fullmatch(image_id) or entry.is_symlink() or not entry.is_dir():
            return "not a dump directory"
        try:
            intent = DumpIntent.model_validate_json((entry / INTENT_FILE).read_bytes())
        except (OSError, ValidationError):
            return "no intent.json: the dump had not begun"
        pending = PendingImage(program_dir, program, image_id, intent)
        sealed = pending.sealed_meta()
        if sealed is not None:
            try:
                self._verify_files(sealed, pending.criu_dir)
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

    def being_made(self, program: str, image_id: str) -> bool:
        """A dump or an import of this image is in progress (its partial directory exists)."""
        return (self._program_dir(program) / f"{PARTIAL_PREFIX}{image_id}").is_dir()

    def programs(self) -> builtins.list[str]:
        """Names of programs that have an image directory, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        )

    def usage(self, program: str) -> tuple[int, int]:
        """(number of images, bytes their files take, meta.json included) of `program`."""
        images = self.list(program)
        total = sum(
            path.lstat().st_size
            for image in images
            for _, path in walk_tree(self._image_dir(image))[0]
        )
        return len(images), total

    def free_bytes(self) -> int:
        """Bytes available to the supervisor on the filesystem of state_dir."""
        path = self.state_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def image_dir(self, image: ImageMeta) -> Path:
        """The directory of a published image (meta.json and criu/)."""
        return self._image_dir(image)

    def _program_dir(self, program: str) -> Path:
        return self.root / validate_program_name(program)

    def _image_dir(self, image: ImageMeta) -> Path:
        return self._program_dir(image.program) / validate_image_id(image.id)

    def _read_program(self, program: str) -> Iterator[ImageMeta]:
        program_dir = self._program_dir(program)
        if not program_dir.is_dir():
            return
        for entry in program_dir.iterdir():
            if not _IMAGE_ID.fullmatch(entry.name):
                continue
            stranger = _foreign_owner(entry) or _foreign_owner(entry / META_FILE)
            if stranger is not None:
                log.warning(
                    "image_skipped",
                    path=str(entry),
                    reason=f"owned by uid {stranger}, not by the supervisor's user: not trusted",
                )
                continue
            meta = _read_meta(entry / META_FILE)
            if meta is None:
                continue
            if meta.id != entry.name or meta.program != program:
                log.warning(
                    "image_skipped",
                    path=str(entry),
                    reason=f"meta.json names image {meta.id} of program {meta.program!r}",
                )
                continue
            yield meta

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir():
            return
        try:
            make_private_dir(path)
        except FileExistsError:
            if not path.is_dir():
                raise
            return  # made meanwhile by a dump of another program
        fsync_dir(path.parent)


def _check_received(
    meta: ImageMeta,
    image_id: str,
    program: str,
    records: Mapping[str, FileRecord],
    criu_dir: Path,
) -> None:
    """Raise unless the received files are exactly those meta.json lists, byte for byte."""
    if (meta.id, meta.program) != (image_id, program):
        raise ValueError(f"meta.json names image {meta.id} of {meta.program!r}")
    for rel in sorted(set(records) | set(meta.checksums)):
        record = records.get(rel)
        where = f"{CRIU_SUBDIR}/{rel}"
        if record is None:
            raise ImageCorrupt(meta, where, "is missing")
        if rel not in meta.checksums:
            raise ImageCorrupt(meta, where, "is not listed in meta.json")
        digest = (
            record.digest
            if meta.checksum_algorithm == NEW_IMAGE_ALGORITHM
            else digest_of(criu_dir / rel, meta.checksum_algorithm)
        )
        if digest != meta.checksums[rel]:
            raise ImageCorrupt(
                meta, where, f"does not match its {meta.checksum_algorithm} checksum"
            )


def _match_ref(images: list[ImageMeta], ref: str) -> list[ImageMeta]:
    """Images `ref` can mean, as a full id, an id prefix or an IDX (a 4-digit decimal ref may
    be both; it resolves only if both readings agree)."""
    matches: dict[str, ImageMeta] = {}
    if _HEX.fullmatch(ref) and len(ref) >= MIN_PREFIX_LEN:
        matches.update((m.id, m) for m in images if m.id.startswith(ref))
    if _DECIMAL.fullmatch(ref) and int(ref) < len(images):
        chosen = images[int(ref)]
        matches[chosen.id] = chosen
    return list(matches.values())


def _foreign_owner(path: Path) -> int | None:
    """The owner of `path` when it is not the supervisor's user (None if it is, or is gone)."""
    try:
        uid = path.lstat().st_uid
    except FileNotFoundError:
        return None
    return uid if uid != os.geteuid() else None


def _read_meta(path: Path) -> ImageMeta | None:
    try:
        return ImageMeta.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        log.warning("image_skipped", path=str(path.parent), reason="no meta.json")
    except (OSError, ValidationError) as exc:
        log.warning("image_skipped", path=str(path.parent), reason=f"bad meta.json: {exc}")
    return None


def _remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
