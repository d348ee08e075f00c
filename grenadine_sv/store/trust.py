"""Which directories the supervisor may trust with process memory and program output.

The rule is sshd's StrictModes: every directory from / down to the one used must be owned by
root or by the supervisor's user and writable by no one else, so that no other user can swap
or plant anything on the way. A root-owned directory with the sticky bit (such as /tmp) is
safe above the last component: others may create entries in it but not rename or remove ours.

The walk opens one component at a time relative to the previous one without following
symlinks, so what is checked is what is used. Symlinks in the configured path itself (/var/run
-> /run, say) are resolved first, by realpath; one that appears between the two fails the walk.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ROOT_UID = 0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedPath(PermissionError):
    """A directory or file on the way could be changed by another user."""


def open_trusted_dir(path: Path, *, what: str = "directory", above: bool = False) -> int:
    """An fd of directory `path` after checking every directory from / down to it; the caller
    closes it. Raise UntrustedPath naming the first one that fails and why. With `above`,
    `path` is where a directory is about to be created (a sticky /tmp is fine there)."""
    euid = os.geteuid()
    real = Path(os.path.realpath(path))
    fd = os.open("/", _DIR_FLAGS)
    try:
        last = real == Path("/") and not above
        _check(fd, Path("/"), euid, last=last, what=what, configured=path)
        walked = Path("/")
        for index, part in enumerate(real.parts[1:], start=2):
            walked /= part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UntrustedPath(
                    f"{what} {path}: {walked} cannot be opened as a directory without following "
                    f"a symlink ({exc.strerror}); was it replaced while being checked?"
                ) from exc
            os.close(fd)
            fd = child
            last = index == len(real.parts) and not above
            _check(fd, walked, euid, last=last, what=what, configured=path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_trusted_dir(path: Path, *, what: str = "directory") -> None:
    """Raise UntrustedPath unless `path` and every directory above it can be trusted."""
    os.close(open_trusted_dir(path, what=what))


def check_trusted_to_create(path: Path, *, what: str = "directory") -> None:
    """Before creating `path` (and missing parents): its nearest existing ancestor must be
    trusted, so that nothing is created inside another user's directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        check_trusted_dir(path, what=what)
        return
    try:
        os.close(open_trusted_dir(existing, what=what, above=True))
    except UntrustedPath as exc:
        raise UntrustedPath(f"{exc} (about to create {path})") from exc


def check_owned_file(dir_fd: int, name: str, shown: Path, *, what: str = "file") -> None:
    """Refuse an existing entry `name` of a trusted directory that is a symlink, not a regular
    file, or owned by another user (a planted log or image file). A missing one is fine."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedPath(f"{what} {shown} is a symbolic link: remove it")
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedPath(f"{what} {shown} is not a regular file: remove it")
    if info.st_uid != os.geteuid():
        raise UntrustedPath(
            f"{what} {shown} is owned by uid {info.st_uid}, not by the supervisor's user "
            f"(uid {os.geteuid()}): another user made it; remove it"
        )


def _check(fd: int, walked: Path, euid: int, *, last: bool, what: str, configured: Path) -> None:
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    where = f"{what} {configured}" if walked == configured else f"{what} {configured}: {walked}"
    if info.st_uid not in (ROOT_UID, euid):
        raise UntrustedPath(
            f"{where} is owned by uid {info.st_uid}, neither root nor the supervisor's user "
            f"(uid {euid}): that user could replace what is below it; chown it or choose "
            "another place"
        )
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    if not last and info.st_uid == ROOT_UID and mode & stat.S_ISVTX:
        return  # like /tmp: others cannot rename or remove what is ours in it
    raise UntrustedPath(
        f"{where} is writable by other users (mode {mode:o}): they could replace what is "
        f"below it; chmod go-w {walked}"
    )
