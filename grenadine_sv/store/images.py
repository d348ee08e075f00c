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

Everything here blocks on disk I/O: the supervisor calls it through `trio.to_thread`. What
an image is (its metadata, the layout's names) is image_meta.py; an image on its way in,
pending.py.
"""

from __future__ import annotations

import builtins
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import structlog
from pydantic import ValidationError

from grenadine_sv.store.durable import (
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    make_private_dir,
)
from grenadine_sv.store.image_meta import (
    CORRUPT_MARK,
    CRIU_SUBDIR,
    DECIMAL_PATTERN,
    DELETING_PREFIX,
    HEX_PATTERN,
    IMAGE_ID_PATTERN,
    IMAGES_SUBDIR,
    META_FILE,
    MIN_PREFIX_LEN,
    PARTIAL_PREFIX,
    AmbiguousImage,
    DumpIntent,
    ImageCorrupt,
    ImageMeta,
    ImageNotFound,
    Trigger,
    current_boot_id,
    match_ref,
    validate_image_id,
    validate_program_name,
)
from grenadine_sv.store.pending import PartialsRecovered, PendingImage, recover_partials
from grenadine_sv.store.sealing import (
    walk_tree,
)
from grenadine_sv.store.snapshot import SnapshotMismatch, check_snapshot
from grenadine_sv.store.trust import check_trusted_dir
from grenadine_sv.store.verification import check_files, verify_file, verify_files

# Kept importable from here, where the rest of the project takes them from.
__all__ = [
    "CRIU_SUBDIR",
    "IMAGES_SUBDIR",
    "META_FILE",
    "AmbiguousImage",
    "DumpIntent",
    "ImageCorrupt",
    "ImageMeta",
    "ImageNotFound",
    "ImageStore",
    "PartialsRecovered",
    "PendingImage",
    "Trigger",
    "current_boot_id",
    "validate_image_id",
    "validate_program_name",
]

log = structlog.get_logger(__name__)


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
        matches = match_ref(images, ref)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(m.id for m in matches)
            raise AmbiguousImage(
                f"image reference {ref!r} of program {program!r} matches {len(matches)} "
                f"images ({ids}); give more characters of the id"
            )
        hint = ""
        if (
            HEX_PATTERN.fullmatch(ref)
            and len(ref) < MIN_PREFIX_LEN
            and not DECIMAL_PATTERN.fullmatch(ref)
        ):
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
            check_files(image, self.criu_dir(image))
        except ImageCorrupt as exc:
            return f"{exc.path} {exc.reason}"
        return None

    def verify(self, image: ImageMeta, *, skip: Callable[[str], bool] | None = None) -> None:
        """Check every file of `image` against its recorded size and digest; raise ImageCorrupt
        naming the first file that is missing, extra, resized or altered. Files for which
        `skip` is true get the cheap checks only (a lazy restore hashes them as it serves)."""
        verify_files(image, self.criu_dir(image), skip)
        if image.records_snapshot:
            try:
                check_snapshot(self._image_dir(image), image.snapshot_files)
            except SnapshotMismatch as exc:
                raise ImageCorrupt(image, exc.path, exc.reason) from exc

    def verify_file(self, image: ImageMeta, rel: str, criu_dir: Path | None = None) -> None:
        """Hash one file of `image` and raise ImageCorrupt if it does not match."""
        verify_file(image, rel, criu_dir if criu_dir is not None else self.criu_dir(image))

    def delete(self, image: ImageMeta, *, files_later: bool = False) -> None:
        """Remove `image`: first unlisted by one durable rename, then its files; with
        `files_later` the files are left for remove_deleted_files (a supervisor start
        removes any that a kill left)."""
        program_dir = self._program_dir(image.program)
        try:
            os.rename(program_dir / image.id, self._deleting_dir(image))
        except FileNotFoundError:
            raise ImageNotFound(
                f"program {image.program!r} has no image {image.id} (already deleted?)"
            ) from None
        fsync_dir(program_dir)
        if not files_later:
            self.remove_deleted_files(image)

    def remove_deleted_files(self, image: ImageMeta) -> None:
        """The files of an image that delete(files_later=True) unlisted."""
        shutil.rmtree(self._deleting_dir(image))
        log.info("image_deleted", program=image.program, image_id=image.id)

    def _deleting_dir(self, image: ImageMeta) -> Path:
        return self._program_dir(image.program) / f"{DELETING_PREFIX}{validate_image_id(image.id)}"

    def prune(
        self, program: str, keep: int, in_use: Collection[str] = (), *, files_later: bool = False
    ) -> builtins.list[ImageMeta]:
        """Delete all but the `keep` newest images of `program`, and return the deleted ones.

        The newest pre-deploy image is never deleted and does not count against `keep`: it is
        what a rollback restores, however many checkpoints were taken since the deploy. Images
        whose id is in `in_use` (a restore of them is under way, or a lazy restore still serves
        memory from them) are not deleted either.
        """
        doomed = self.prune_plan(self.list(program), keep, in_use)
        for image in doomed:
            self.delete(image, files_later=files_later)
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
        """Deal with what interrupted dumps and deletes left behind (pending.recover_partials).
        Call it only when no dump is in progress."""
        return recover_partials(self.root, self.programs())

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
            if not IMAGE_ID_PATTERN.fullmatch(entry.name):
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
