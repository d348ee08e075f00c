"""Image archives: one image as a single stream, to move it to another host.

An archive is a tar stream of `meta.json` (with every file's size and digest) followed by the
image's `criu/` files and then its snapshot files (`files/`, with their owners and modes),
zstd-compressed by default, and age-encrypted when recipients are given (`.tar`, `.tar.zst`,
`.tar.zst.age`). Writing and reading both stream in fixed-size chunks, so memory use does not
depend on the image's size.

Reading writes into a hidden partial directory of the image store, checks every file against
meta.json as it arrives (and the snapshot files again, as a whole, before publishing), reads
the stream to its end (age authenticates its last chunk there), and only then publishes the
image with one rename, as a local checkpoint does.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

import blake3
from pydantic import ValidationError

from grenadine_sv.store.definition import CurrentDefinition, definition_changes
from grenadine_sv.store.durable import DIR_MODE, create_private_file, make_private_dir
from grenadine_sv.store.encryption import (
    AGE_MAGIC,
    DecryptionFailed,
    decrypt_stream,
    encrypt_stream,
)
from grenadine_sv.store.images import (
    CRIU_SUBDIR,
    META_FILE,
    ImageCorrupt,
    ImageMeta,
    ImageStore,
    PendingImage,
)
from grenadine_sv.store.sealing import ChecksumAlgorithm
from grenadine_sv.store.snapshot import FILES_SUBDIR, SnapshotEntry

Compression = Literal["none", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("zstd", "none")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
CHUNK_BYTES = 1 << 20
MAX_META_BYTES = 16 << 20
_MEMBER_PREFIX = f"{CRIU_SUBDIR}/"
_SNAPSHOT_PREFIX = f"{FILES_SUBDIR}/"

Progress = Callable[[int, int], None]
"""Called with (bytes of image files done, bytes of image files in all)."""

Acceptance = Callable[[ImageMeta], None]
"""Called with an archive's meta.json before any file is written; raises ArchiveRefused to
refuse the archive (an unknown program, a different definition)."""


class ArchiveRefused(Exception):
    """An archive was not imported; the message is a sentence saying why."""


def acceptance(
    definition_of: Callable[[str], CurrentDefinition | None],
    defined_by: str,
    allow_changed: bool,
) -> Acceptance:
    """The test an archive's meta.json passes before anything is received: its program must
    be defined here (`definition_of` gives its definition now, None when `defined_by` does
    not define it), by the definition the image was taken under unless `allow_changed`."""

    def accept(meta: ImageMeta) -> None:
        current = definition_of(meta.program)
        if current is None:
            raise ArchiveRefused(
                f"it holds an image of program {meta.program!r}, which {defined_by} does not define"
            )
        check = definition_changes(meta.definition, meta.definition_digest, current)
        if not check.unchanged and not allow_changed:
            raise ArchiveRefused(
                f"its image of {meta.program} was taken under another definition of the "
                f"program ({check.describe()}); allow it with --allow-changed-definition"
            )

    return accept


def archive_suffix(compress: Compression, encrypted: bool) -> str:
    return ".tar" + (".zst" if compress == "zstd" else "") + (".age" if encrypted else "")


# writing ---------------------------------------------------------------------


def write_archive(
    store: ImageStore,
    image: ImageMeta,
    sink: BinaryIO,
    *,
    compress: Compression = "zstd",
    recipients: list[Any] | None = None,
    progress: Progress | None = None,
) -> None:
    """Write `image` as an archive into `sink`; encrypted when `recipients` (pyrage
    recipients) are given. Raises ArchiveRefused, before writing anything, for an image
    that cannot be verified on arrival."""
    check_exportable(store, image)

    def write_plain(out: BinaryIO) -> None:
        if compress == "zstd":
            import zstandard

            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            with compressor.stream_writer(out, closefd=False) as compressed:
                _write_tar(store, image, compressed, progress)
        else:
            _write_tar(store, image, out, progress)

    if not recipients:
        write_plain(sink)
        return
    with _ProducerThread(write_plain) as producer:
        encrypt_stream(producer.reader, sink, recipients)
        producer.finish()


class ArchiveStream:
    """`image`'s archive as a readable stream (`reader`), written by a thread: for a consumer
    that pulls, such as an upload. Call `finish` after reading to the end: it raises if the
    archive could not be written whole."""

    def __init__(
        self,
        store: ImageStore,
        image: ImageMeta,
        recipients: list[Any] | None,
        compress: Compression = "zstd",
    ) -> None:
        check_exportable(store, image)
        self._producer = _ProducerThread(
            lambda out: write_archive(store, image, out, compress=compress, recipients=recipients)
        )
        self.reader = self._producer.reader

    def finish(self) -> None:
        self._producer.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._producer.__exit__(exc_type, exc, tb)


def check_exportable(store: ImageStore, image: ImageMeta) -> None:
    """Raise ArchiveRefused for an image whose snapshot files meta.json does not record
    (taken before they were): the receiving host could not verify them."""
    if not image.records_snapshot and (store.image_dir(image) / FILES_SUBDIR).exists():
        raise ArchiveRefused(
            f"image {image.id} of {image.program} holds snapshot files that its "
            f"{META_FILE} does not record (format_version {image.format_version}, taken by an "
            "older grenadine-sv), so another host could not verify them: checkpoint the "
            "program again and move the new image"
        )


def _total_bytes(meta: ImageMeta) -> int:
    return sum(meta.file_sizes.values()) + sum(e.size for e in meta.snapshot_files.values())


def _write_tar(
    store: ImageStore, image: ImageMeta, out: BinaryIO, progress: Progress | None
) -> None:
    image_dir = store.image_dir(image)
    criu_dir = store.criu_dir(image)
    meta_bytes = (image_dir / META_FILE).read_bytes()
    total = _total_bytes(image)
    counter = _Counter(total, progress)
    mtime = int(image.created.timestamp())
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = CHUNK_BYTES  # type: ignore[attr-defined]
        tar.addfile(_member(META_FILE, len(meta_bytes), mtime), io.BytesIO(meta_bytes))
        for rel in sorted(image.checksums):
            with (criu_dir / rel).open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                member = _member(f"{_MEMBER_PREFIX}{rel}", size, mtime)
                tar.addfile(member, _CountingReader(file, counter))
        files_dir = image_dir / FILES_SUBDIR
        for rel, entry in sorted(image.snapshot_files.items()):
            _add_snapshot_entry(tar, files_dir / rel, rel, entry, counter)


def _add_snapshot_entry(
    tar: tarfile.TarFile, path: Path, rel: str, entry: SnapshotEntry, counter: _Counter
) -> None:
    """One entry of files/, as meta.json records it (the receiver checks the contents)."""
    info = tarfile.TarInfo(f"{_SNAPSHOT_PREFIX}{rel}")
    info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
    info.mtime = int(path.lstat().st_mtime)
    if entry.kind == "file":
        with path.open("rb") as file:
            info.size = os.fstat(file.fileno()).st_size
            tar.addfile(info, _CountingReader(file, counter))
        return
    info.type = _TAR_TYPES[entry.kind]
    info.linkname = entry.target
    tar.addfile(info)


_TAR_TYPES = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "fifo": tarfile.FIFOTYPE}


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = mtime
    return info


# reading ---------------------------------------------------------------------


def read_archive(
    store: ImageStore,
    source: BinaryIO,
    *,
    identities: list[Any] | None,
    accept: Acceptance,
    progress: Progress | None = None,
) -> ImageMeta:
    """Import the archive `source` into `store` and return its image, or raise
    ArchiveRefused (nothing is left behind). `source` must support peek (a BufferedReader);
    an encrypted archive needs `identities`."""
    head = _peek(source, len(AGE_MAGIC))
    if not head.startswith(AGE_MAGIC):
        return _import(store, source, accept, progress, lambda: None)
    if not identities:
        raise ArchiveRefused(
            "the archive is encrypted (age) and no [supervisor.remote.encryption] "
            "identity_file is configured to decrypt it"
        )

    def decrypt(out: BinaryIO) -> None:
        decrypt_stream(source, out, identities)

    try:
        with _ProducerThread(decrypt) as producer:
            # Publish only once the last chunk is authenticated: finish() raises otherwise.
            return _import(store, producer.reader, accept, progress, producer.finish)
    except DecryptionFailed as exc:
        raise ArchiveRefused(f"the archive was refused: {exc}") from exc


def _import(
    store: ImageStore,
    source: BinaryIO,
    accept: Acceptance,
    progress: Progress | None,
    before_publish: Callable[[], None],
) -> ImageMeta:
    """Extract the plain (maybe compressed) tar stream into a pending image whose files all
    match meta.json, read `source` to its end, call `before_publish`, and publish the image.
    On any error the pending image is removed."""
    stream: BinaryIO = source
    if _peek(source, len(ZSTD_MAGIC)) == ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            source, read_size=CHUNK_BYTES, closefd=False
        )
        stream = reader
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (closed in finally)
    except tarfile.TarError as exc:
        raise ArchiveRefused(f"this is not an image archive (tar: {exc})") from exc
    except Exception as exc:
        raise ArchiveRefused(f"the archive cannot be read: {exc}") from exc
    try:
        meta = _read_meta(tar)
        accept(meta)
        try:
            pending = store.begin_import(meta)
        except FileExistsError as exc:
            raise ArchiveRefused(str(exc)) from exc
        with pending:
            _extract_files(tar, meta, pending, _Counter(_total_bytes(meta), progress))
            for remaining in (stream, source):
                while remaining.read(CHUNK_BYTES):
                    pass
            before_publish()
            pending.publish_received(meta)
            return meta
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveRefused(f"the archive is truncated or damaged (tar: {exc})") from exc
    except ImageCorrupt as exc:
        raise ArchiveRefused(f"the archive was refused: {exc.path} {exc.reason}") from exc
    except (ArchiveRefused, DecryptionFailed):
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and not _is_decompression_error(exc):
            raise
        raise ArchiveRefused(f"the archive is truncated or damaged ({exc})") from exc
    finally:
        tar.close()


def _is_decompression_error(exc: Exception) -> bool:
    return type(exc).__module__.startswith("zstd") or "zstd" in str(exc).lower()


def _read_meta(tar: tarfile.TarFile) -> ImageMeta:
    first = tar.next()
    if first is None or first.name != META_FILE or not first.isreg():
        raise ArchiveRefused(f"this is not an image archive: it does not start with {META_FILE}")
    if first.size > MAX_META_BYTES:
        raise ArchiveRefused(f"the archive's {META_FILE} is {first.size} bytes: too large")
    extracted = tar.extractfile(first)
    assert extracted is not None
    try:
        return ImageMeta.model_validate_json(extracted.read())
    except ValidationError as exc:
        raise ArchiveRefused(f"the archive's {META_FILE} is not valid: {exc}") from exc


def _extract_files(
    tar: tarfile.TarFile, meta: ImageMeta, pending: PendingImage, counter: _Counter
) -> None:
    seen: set[str] = set()
    snapshot = _SnapshotReceiver(meta, pending.criu_dir.parent / FILES_SUBDIR, counter)
    while (member := tar.next()) is not None:
        name = member.name
        if name.startswith(_SNAPSHOT_PREFIX):
            snapshot.receive(tar, member)
            continue
        rel = name.removeprefix(_MEMBER_PREFIX)
        if not name.startswith(_MEMBER_PREFIX) or rel not in meta.checksums:
            raise ArchiveRefused(f"the archive holds {name!r}, which its {META_FILE} does not list")
        if rel in seen:
            raise ArchiveRefused(f"the archive holds {name!r} twice")
        if not member.isreg():
            raise ArchiveRefused(f"the archive's {name!r} is not a regular file")
        _check_inside(name, rel)
        parts = PurePosixPath(rel).parts
        expected_size = meta.file_sizes.get(rel)
        if expected_size is not None and member.size != expected_size:
            raise ImageCorrupt(meta, name, f"has {member.size} bytes, expected {expected_size}")
        seen.add(rel)
        target = pending.criu_dir.joinpath(*parts)
        target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        digest = _receive_file(tar, member, target, meta.checksum_algorithm, counter)
        if digest != meta.checksums[rel]:
            raise ImageCorrupt(meta, name, f"does not match its {meta.checksum_algorithm} checksum")
    missing = sorted(set(meta.checksums) - seen)
    if missing:
        raise ImageCorrupt(meta, f"{_MEMBER_PREFIX}{missing[0]}", "is missing from the archive")
    snapshot.finish()


def _check_inside(name: str, rel: str) -> None:
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
        raise ArchiveRefused(f"the archive's {name!r} points outside the image")


def _receive_file(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    target: Path,
    algorithm: ChecksumAlgorithm,
    counter: _Counter,
) -> str:
    """Write the member's contents to a new private file `target`; returns their digest."""
    extracted = tar.extractfile(member)
    assert extracted is not None
    digest = _hasher(algorithm)
    with os.fdopen(create_private_file(target), "wb") as out:
        while chunk := extracted.read(CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
            counter.add(len(chunk))
    return str(digest.hexdigest())


class _SnapshotReceiver:
    """Recreates the image's files/ from the archive's `files/` members: only entries that
    meta.json records, each of its recorded kind, inside a directory received before it (so
    never through a symlink), with the recorded owner and mode; a file's contents checked
    against its recorded digest as it arrives. `finish` checks that nothing is missing."""

    def __init__(self, meta: ImageMeta, files_dir: Path, counter: _Counter) -> None:
        self._meta = meta
        self._files_dir = files_dir
        self._counter = counter
        self._received: dict[str, Path] = {}
        self._mtimes: list[tuple[Path, int]] = []

    def receive(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        rel = name.removeprefix(_SNAPSHOT_PREFIX)
        entry = self._meta.snapshot_files.get(rel)
        if entry is None:
            raise ArchiveRefused(f"the archive holds {name!r}, which its {META_FILE} does not list")
        if rel in self._received:
            raise ArchiveRefused(f"the archive holds {name!r} twice")
        _check_inside(name, rel)
        kind = _kind_of(member)
        if kind != entry.kind:
            raise ImageCorrupt(self._meta, name, f"is a {kind}, expected a {entry.kind}")
        parent_rel, _, _ = rel.rpartition("/")
        if parent_rel and self._meta.snapshot_files.get(parent_rel, entry).kind != "dir":
            raise ArchiveRefused(f"the archive's {name!r} is not inside a directory")
        if parent_rel and parent_rel not in self._received:
            raise ArchiveRefused(f"the archive's {name!r} comes before its directory")
        if not self._received:
            make_private_dir(self._files_dir)
        parent = self._received[parent_rel] if parent_rel else self._files_dir
        target = parent / PurePosixPath(rel).name
        if entry.kind == "file":
            if member.size != entry.size:
                raise ImageCorrupt(
                    self._meta, name, f"has {member.size} bytes, expected {entry.size}"
                )
            digest = _receive_file(tar, member, target, "blake3", self._counter)
            if digest != entry.digest:
                raise ImageCorrupt(self._meta, name, "does not match its blake3 checksum")
        elif entry.kind == "dir":
            os.mkdir(target, DIR_MODE)
        elif entry.kind == "symlink":
            if member.linkname != entry.target:
                raise ImageCorrupt(
                    self._meta, name, f"points to {member.linkname!r}, expected {entry.target!r}"
                )
            os.symlink(entry.target, target)
        else:
            os.mkfifo(target, 0o600)
        os.lchown(target, entry.uid, entry.gid)
        if entry.kind != "symlink":
            os.chmod(target, entry.mode)
        self._mtimes.append((target, int(member.mtime)))
        self._received[rel] = target

    def finish(self) -> None:
        missing = sorted(set(self._meta.snapshot_files) - set(self._received))
        if missing:
            raise ImageCorrupt(
                self._meta, f"{_SNAPSHOT_PREFIX}{missing[0]}", "is missing from the archive"
            )
        # Last, deepest first: creating an entry changes its directory's times.
        for target, mtime in reversed(self._mtimes):
            os.utime(target, (mtime, mtime), follow_symlinks=False)


def _kind_of(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.isfifo():
        return "fifo"
    return "special file"


def _hasher(algorithm: ChecksumAlgorithm) -> Any:
    if algorithm == "blake3":
        return blake3.blake3()
    return hashlib.sha256()


def _peek(source: BinaryIO, size: int) -> bytes:
    peek = getattr(source, "peek", None)
    if peek is None:
        raise TypeError("an archive source must support peek (open it buffered)")
    data: bytes = peek(size)
    return data[:size]


# plumbing --------------------------------------------------------------------


class _ProducerThread:
    """A readable stream (`reader`) of what `produce` writes, run in a thread through a pipe.
    `finish` waits for the thread and raises its error, if any: that error is the cause of
    whatever the reader saw go wrong (such as a stream that ended early), so leaving the
    context raises it in preference to the reader's."""

    def __init__(self, produce: Callable[[BinaryIO], None]) -> None:
        read_fd, write_fd = os.pipe()
        self.reader: BinaryIO = os.fdopen(read_fd, "rb", buffering=CHUNK_BYTES)
        self._errors: list[BaseException] = []

        def run() -> None:
            try:
                with os.fdopen(write_fd, "wb", buffering=CHUNK_BYTES) as writer:
                    produce(writer)
            except BrokenPipeError:
                pass  # the reader stopped first; its own error is the one to report
            except BaseException as exc:
                self._errors.append(exc)

        self._thread = threading.Thread(target=run, name="archive-stream", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        self._thread.join()
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.reader.close()
        self._thread.join()
        if self._errors and self._errors[0] is not exc:
            raise self._errors[0] from exc


class _Counter:
    """Reports progress at most every CHUNK_BYTES * 8 and at the end."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._reported = 0
        self._progress = progress

    def add(self, count: int) -> None:
        self.done += count
        if self._progress is not None and (
            self.done - self._reported >= CHUNK_BYTES * 8 or self.done >= self.total
        ):
            self._reported = self.done
            self._progress(self.done, self.total)


class _CountingReader:
    def __init__(self, file: BinaryIO, counter: _Counter) -> None:
        self._file = file
        self._counter = counter

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._counter.add(len(data))
        return data
