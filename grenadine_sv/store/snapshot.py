"""Files are state too: copies of a program's files taken into its image while the program is
frozen, and written back before it is restored.

An image's `files/` directory holds one entry per snapshot path (`files/0`, `files/1`, ...)
and `files/manifest.json` mapping each program path to its entry. Copies are real copies (ext4
has no reflinks), never follow symlinks (a symlink is copied as a symlink), and keep owners,
modes and times. Sockets cannot be copied and are left out (the program re-creates its own).

When the image is sealed, `seal_snapshot` makes the copies durable and records every entry of
`files/` (kind, owner, mode, and a file's size and BLAKE3 digest, a symlink's target) in
meta.json, so that `check_snapshot` can verify them as the image's other files are verified:
before a restore, and when an image arrives from another host.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from grenadine_sv.store.sealing import blake3_of_fd

FILES_SUBDIR = "files"
MANIFEST = "manifest.json"


class SnapshotError(OSError):
    """A snapshot could not be taken or written back; the message names the path."""


EntryKind = Literal["file", "dir", "symlink", "fifo"]


class SnapshotEntry(BaseModel):
    """What meta.json records of one entry under files/."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: EntryKind
    mode: int
    """Permission bits (with setuid, setgid and sticky)."""
    uid: int
    gid: int
    size: int = 0
    """Of a file."""
    digest: str = ""
    """BLAKE3 of a file."""
    target: str = ""
    """Of a symlink."""


class SnapshotMismatch(Exception):
    """The files/ of an image differ from what its meta.json records."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SnapshotSummary:
    """What a snapshot of `snapshot` paths copied into an image."""

    paths: int
    bytes_copied: int


def take_snapshot(sources: Mapping[str, Path], image_dir: Path) -> SnapshotSummary:
    """Copy each host path of `sources` (program path -> host path) into image_dir/files.

    A path that does not exist is recorded as absent (a restore then removes it)."""
    files = image_dir / FILES_SUBDIR
    files.mkdir(mode=0o700)
    manifest: dict[str, str | None] = {}
    copied = 0
    for index, (program_path, host_path) in enumerate(sorted(sources.items())):
        if not os.path.lexists(host_path):
            manifest[program_path] = None
            continue
        entry = str(index)
        try:
            copied += _copy(host_path, files / entry)
        except OSError as exc:
            raise SnapshotError(f"cannot copy {program_path} ({host_path}): {exc}") from exc
        manifest[program_path] = entry
    (files / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return SnapshotSummary(len(manifest), copied)


def snapshot_paths(image_dir: Path) -> dict[str, str | None]:
    """Program path -> entry under files/ (None: it did not exist) of an image's snapshot."""
    path = image_dir / FILES_SUBDIR / MANIFEST
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{path} is not a JSON object")
    return manifest


def write_back(image_dir: Path, targets: Mapping[str, Path]) -> list[str]:
    """Put back the snapshot of each program path in `targets` (program path -> host path)
    that the image holds, replacing what is there now. Returns the program paths written."""
    manifest = snapshot_paths(image_dir)
    written = []
    for program_path, host_path in sorted(targets.items()):
        if program_path not in manifest:
            continue
        entry = manifest[program_path]
        try:
            _remove(host_path)
            if entry is not None:
                _copy(image_dir / FILES_SUBDIR / entry, host_path)
        except OSError as exc:
            raise SnapshotError(f"cannot write back {program_path} ({host_path}): {exc}") from exc
        written.append(program_path)
    return written


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _copy(source: Path, target: Path) -> int:
    """Copy one file, symlink, FIFO or directory tree; returns the bytes of file data copied."""
    info = os.lstat(source)
    mode = info.st_mode
    copied = 0
    if stat.S_ISDIR(mode):
        os.mkdir(target, 0o700)
        with os.scandir(source) as entries:
            for entry in entries:
                copied += _copy(Path(entry.path), target / entry.name)
    elif stat.S_ISREG(mode):
        shutil.copyfile(source, target, follow_symlinks=False)
        copied = info.st_size
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(target)
    else:
        return 0  # sockets and device nodes are not copied
    os.lchown(target, info.st_uid, info.st_gid)
    if not stat.S_ISLNK(mode):
        os.chmod(target, stat.S_IMODE(mode))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
    return copied


def seal_snapshot(image_dir: Path) -> dict[str, SnapshotEntry]:
    """Make the image's files/ durable (every file and directory fsynced) and record each
    entry under it by its path relative to files/; empty when the image has no files/."""
    return _record(image_dir / FILES_SUBDIR, sync=True)


def check_snapshot(
    image_dir: Path, recorded: Mapping[str, SnapshotEntry], *, sync: bool = False
) -> None:
    """Raise SnapshotMismatch naming the first entry of the image's files/ that is missing,
    extra, or not as `recorded` (kind, owner, mode, size, contents, symlink target). With
    `sync`, also make files/ durable (for files just received)."""
    files = image_dir / FILES_SUBDIR
    if not recorded:
        if os.path.lexists(files):
            raise SnapshotMismatch(f"{FILES_SUBDIR}/", "is not recorded in meta.json")
        return
    try:
        present = _record(files, sync=sync)
    except OSError as exc:
        raise SnapshotMismatch(f"{FILES_SUBDIR}/", f"cannot be read ({exc})") from exc
    for rel in sorted(set(recorded) | set(present)):
        where = f"{FILES_SUBDIR}/{rel}"
        expected, found = recorded.get(rel), present.get(rel)
        if found is None:
            raise SnapshotMismatch(where, "is missing")
        if expected is None:
            raise SnapshotMismatch(where, "is not recorded in meta.json")
        if found != expected:
            raise SnapshotMismatch(where, _difference(expected, found))


def _difference(expected: SnapshotEntry, found: SnapshotEntry) -> str:
    if found.kind != expected.kind:
        return f"is a {found.kind}, expected a {expected.kind}"
    if found.size != expected.size:
        return f"has {found.size} bytes, expected {expected.size}"
    if found.digest != expected.digest:
        return "does not match its blake3 checksum"
    if found.target != expected.target:
        return f"points to {found.target!r}, expected {expected.target!r}"
    return (
        f"has owner {found.uid}:{found.gid} and mode {found.mode:o}, expected "
        f"{expected.uid}:{expected.gid} and {expected.mode:o}"
    )


def _record(files: Path, *, sync: bool) -> dict[str, SnapshotEntry]:
    if not os.path.lexists(files):
        return {}
    if not files.is_dir() or files.is_symlink():
        raise SnapshotError(f"{files} is not a directory")
    entries: dict[str, SnapshotEntry] = {}
    directories = [files]
    for dirpath, dirnames, filenames in os.walk(files):
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            rel = path.relative_to(files).as_posix()
            entries[rel] = _entry(path, sync=sync)
            if entries[rel].kind == "dir":
                directories.append(path)
    if sync:
        for directory in directories:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return entries


def _entry(path: Path, *, sync: bool) -> SnapshotEntry:
    info = os.lstat(path)
    mode = info.st_mode
    kind: EntryKind
    size, digest, target = 0, "", ""
    if stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind, target = "symlink", os.readlink(path)
    elif stat.S_ISFIFO(mode):
        kind = "fifo"
    elif stat.S_ISREG(mode):
        kind = "file"
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if sync:
                os.fsync(fd)
            size, digest = os.fstat(fd).st_size, blake3_of_fd(fd)
        finally:
            os.close(fd)
    else:
        raise SnapshotError(f"{path} is neither a file, a directory, a symlink nor a FIFO")
    return SnapshotEntry(
        kind=kind,
        mode=stat.S_IMODE(mode),
        uid=info.st_uid,
        gid=info.st_gid,
        size=size,
        digest=digest,
        target=target,
    )
