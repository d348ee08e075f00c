"""`export` and `import`: move an image between hosts as one archive. They work on the image
store directly (no running supervisor needed); the heavy modules are imported when run."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from grenadine_sv.cli.local import load_or_explain
from grenadine_sv.cli.progress import MIB, TerminalProgress

if TYPE_CHECKING:
    from grenadine_sv.store.images import ImageMeta

READ_BUFFER_BYTES = 1 << 20


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"grenadine-sv: {message}", file=sys.stderr)
    return code


def export(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.store.archive import archive_suffix, write_archive
    from grenadine_sv.store.encryption import EncryptionKeyError, parse_recipients
    from grenadine_sv.store.images import ImageStore

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    recipients: list[Any] | None = None
    if not args.no_encrypt:
        remote = config.supervisor.remote
        configured = remote.encryption.recipients if remote is not None else []
        if not configured:
            return _fail(
                "export writes encrypted archives: set [supervisor.remote.encryption] "
                "recipients, or pass --no-encrypt to write the image's memory in the clear",
                EXIT_USAGE,
            )
        try:
            recipients = parse_recipients(configured)
        except EncryptionKeyError as exc:
            return _fail(str(exc), EXIT_USAGE)
    store = ImageStore(config.supervisor.state_dir)
    try:
        image = store.resolve(args.name, args.image)
    except (LookupError, ValueError) as exc:
        if args.name not in config.programs and not store.list(args.name):
            return _fail(f"export failed: no such program: {args.name}", EXIT_USAGE)
        return _fail(f"export failed: {exc}", EXIT_USAGE)
    destination = args.output or f"{image.program}-{image.id}" + archive_suffix(
        args.compress, recipients is not None
    )
    if destination == "-" and sys.stdout.isatty():
        return _fail("will not write an archive to a terminal: use -o FILE, or a pipe", EXIT_USAGE)
    progress = _progress(f"export {image.program} {image.id[:12]}")
    began = time.monotonic()
    try:
        with _sink(destination) as sink:
            counter = _CountingWriter(sink)
            write_archive(
                store,
                image,
                counter,  # type: ignore[arg-type]
                compress=args.compress,
                recipients=recipients,
                progress=progress,
            )
    except OSError as exc:
        return _fail(f"export failed: {exc}")
    finally:
        if progress is not None:
            progress.done()
    what = f"exported image {image.id} of {image.program} to {destination}"
    _report(what, image, counter.count, began)
    return EXIT_OK


def import_archive(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.store.archive import ArchiveRefused, acceptance, read_archive
    from grenadine_sv.store.encryption import EncryptionKeyError, load_identities
    from grenadine_sv.store.images import ImageStore
    from grenadine_sv.store.trust import check_trusted_to_create
    from grenadine_sv.supervisor.definitions import current_definition

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    identities: list[Any] | None = None
    remote = config.supervisor.remote
    if remote is not None and remote.encryption.identity_file is not None:
        try:
            identities = load_identities(remote.encryption.identity_file)
        except EncryptionKeyError as exc:
            return _fail(str(exc), EXIT_USAGE)
    if args.file != "-" and not os.path.lexists(args.file):
        return _fail(f"import: no such file: {args.file}", EXIT_USAGE)
    store = ImageStore(config.supervisor.state_dir)
    progress = _progress(f"import {args.file}")
    began = time.monotonic()
    try:
        # An image is process memory: it goes only into a state_dir others cannot touch.
        if not store.state_dir.exists():
            check_trusted_to_create(store.state_dir, what="state_dir")
            store.state_dir.mkdir(mode=0o700, parents=True)
        store.check_trusted()
        with _source(args.file) as source:
            counter = _CountingReader(source)
            image = read_archive(
                store,
                counter,  # type: ignore[arg-type]
                identities=identities,
                accept=acceptance(
                    lambda name: (
                        current_definition(config.programs[name])
                        if name in config.programs
                        else None
                    ),
                    str(config.path),
                    args.allow_changed_definition,
                ),
                progress=progress,
            )
    except ArchiveRefused as exc:
        return _fail(f"import of {args.file} refused: {exc}")
    except OSError as exc:
        return _fail(f"import of {args.file} failed: {exc}")
    finally:
        if progress is not None:
            progress.done()
    _report(f"imported image {image.id} of {image.program}", image, counter.count, began)
    out.write(f"restore it with: grenadine-sv restore {image.program} {image.id}\n")
    return EXIT_OK


def _progress(label: str) -> TerminalProgress | None:
    return TerminalProgress(label, sys.stderr) if sys.stderr.isatty() else None


def _report(what: str, image: ImageMeta, archive_bytes: int, began: float) -> None:
    seconds = max(time.monotonic() - began, 1e-6)
    image_bytes = sum(image.file_sizes.values())
    ratio = image_bytes / archive_bytes if archive_bytes else 0.0
    print(
        f"{what}: {image_bytes / MIB:.1f} MiB of image in a {archive_bytes / MIB:.1f} MiB "
        f"archive (ratio {ratio:.2f}) in {seconds:.2f} s ({image_bytes / MIB / seconds:.1f} "
        "MiB/s)",
        file=sys.stderr,
    )


@contextlib.contextmanager
def _sink(destination: str) -> Iterator[BinaryIO]:
    """Standard output, or a file that appears complete or not at all (0600)."""
    if destination == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(destination)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path())
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _source(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    with open(name, "rb", buffering=READ_BUFFER_BYTES) as file:
        yield file


class _CountingWriter:
    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.count = 0

    def write(self, data: bytes) -> int:
        written = self._sink.write(data)
        self.count += len(data)
        return written

    def flush(self) -> None:
        self._sink.flush()


class _CountingReader:
    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._source.read(size)
        self.count += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        data: bytes = self._source.read1(size)  # type: ignore[attr-defined]
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count: int = self._source.readinto(buffer)  # type: ignore[attr-defined]
        self.count += count
        return count

    def peek(self, size: int = 0) -> bytes:
        data: bytes = self._source.peek(size)  # type: ignore[attr-defined]
        return data
