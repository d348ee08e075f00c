"""Each program's own /tmp on the host: state_dir/tmp/NAME, emptied at each cold start and
kept across restores (the restored program finds the files it had)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

TMP_SUBDIR = "tmp"
# A CRIU external mount's name: the dump records the program's /tmp under it, and a restore
# binds this host's directory in its place.
EXTERNAL_MOUNT_NAME = "grenadine-private-tmp"
STICKY_WORLD_WRITABLE = stat.S_ISVTX | 0o777


def private_tmp_dir(state_dir: Path, program: str) -> Path:
    return state_dir / TMP_SUBDIR / program


def ensure_private_tmp(path: Path) -> Path:
    """Create the directory (like /tmp: mode 1777, owned by root) if it is missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise OSError(f"{path} is not a directory")
    os.chmod(path, STICKY_WORLD_WRITABLE)
    return path


def empty_private_tmp(path: Path) -> Path:
    """Remove everything in the directory (never following symlinks), then ensure it."""
    if path.is_dir() and not path.is_symlink():
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    return ensure_private_tmp(path)
