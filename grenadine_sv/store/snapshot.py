"""Files are state too: copies of a program's files taken into its image while the program is
frozen, and written back before it is restored.

An image's `files/` directory holds one entry per snapshot path (`files/0`, `files/1`, ...)
and `files/manifest.json` mapping each program path to its entry. Copies are real copies (ext4
has no reflinks), never follow symlinks (a symlink is copied as a symlink), and keep owners,
modes and times. Sockets cannot be copied and are left out (the program re-creates its own).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FILES_SUBDIR = "files"
MANIFEST = "manifest.json"


class SnapshotError(OSError):
    """A snapshot could not be taken or written back; the message names the path."""


@dataclass(frozen=True)
class SnapshotSummary:
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
