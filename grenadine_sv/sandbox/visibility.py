"""Which host paths a sandbox cannot see.

A sandbox's root is a bind of the host's `/` alone (non-recursive, so that CRIU dumps a known set
of mounts), plus the launcher's fixed mounts and the program's `binds`. A path on any other host
mount (a separate /home, /srv or /opt partition, an NFS share, a bind mount) is therefore missing
inside, or worse, shows the directory the mount covers on the host. A program whose directory or
executable is there must not start as if nothing were wrong.
"""

from __future__ import annotations

import os
import posixpath
import re
import select
import threading
from collections.abc import Iterable

from grenadine_sv.sandbox.mounts import CGROUP_ROOT, DEFAULT_PATH, HOST_MOUNTS
from grenadine_sv.sandbox.spec import SandboxSpec

MOUNTINFO = "/proc/self/mountinfo"
# Mounted by the launcher itself in every sandbox, besides HOST_MOUNTS.
LAUNCHER_MOUNTS = ("/proc", CGROUP_ROOT)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_points(mountinfo: str) -> tuple[str, ...]:
    """The mount points listed in a /proc/PID/mountinfo text."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(_OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), fields[4]))
    return tuple(points)


def _deepest_containing(path: str, points: Iterable[str]) -> str:
    containing = [point for point in points if _within(path, point)]
    return max(containing, key=len, default="/")


def _within(path: str, point: str) -> bool:
    return point in ("/", path) or path.startswith(point.rstrip("/") + "/")


def hiding_mount(path: str, host_mounts: Iterable[str], binds: Iterable[str]) -> str | None:
    """The host mount point that keeps `path` out of a sandbox with these `binds`, or None.

    Inside, `path` shows what the host has at the deepest bound point above it; that is the
    host's `path` only when no host mount lies between that point and `path`."""
    path = posixpath.normpath(path)
    holder = _deepest_containing(path, host_mounts)
    shown_from = _deepest_containing(path, (*HOST_MOUNTS, *LAUNCHER_MOUNTS, *binds))
    if len(holder) > len(shown_from):
        return holder
    return None


def host_executable(command: str, directory: str, search_path: str) -> str | None:
    """Where exec would find `command` on this host (searched in PATH as execvp does), or None."""
    if "/" in command:
        candidates = [posixpath.join(directory, command)]
    else:
        candidates = [posixpath.join(folder or ".", command) for folder in search_path.split(":")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def hidden_from_sandbox(
    name: str,
    *,
    command: str,
    directory: str,
    search_path: str,
    binds: Iterable[str],
    host_mounts: Iterable[str],
) -> str | None:
    """A sentence naming the program's directory or executable that its sandbox would not see,
    the host mount to blame and the `binds` entry that fixes it; None when both are visible."""
    binds = tuple(binds)
    host_mounts = tuple(host_mounts)
    seen: list[tuple[str, str]] = [("directory", directory)]
    executable = host_executable(command, directory, search_path)
    if executable is not None:
        seen.append(("executable", executable))
    for what, path in seen:
        for form in dict.fromkeys((path, os.path.realpath(path))):
            mount = hiding_mount(form, host_mounts, binds)
            if mount is not None:
                return (
                    f"the {what} {form} is on the host mount {mount}, which the sandbox does"
                    f" not include (its root is the host's / without the mounts below it):"
                    f' add "{mount}" to programs.{name}.binds'
                )
    return None


# How an open mountinfo file reads as polled after a change to its namespace's mounts.
CHANGED = select.POLLPRI | select.POLLERR


class MountTable:
    """The mount points of `path` (a /proc/PID/mountinfo), read again only once they changed.

    The kernel marks an open mountinfo file POLLPRI | POLLERR after each change to its mount
    namespace's mounts, until it is polled; it is polled before each read, so a change made
    during a read is seen at the next call, never missed (50 programs at once: one read, not
    50)."""

    def __init__(self, path: str = MOUNTINFO) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._watched: int | None = None
        self._watch = select.poll()
        self._points: tuple[str, ...] = ()

    def points(self) -> tuple[str, ...]:
        """The mount points (none when they cannot be read: nothing is then hidden)."""
        with self._lock:
            try:
                if self._watched is None:
                    self._start_watching()
                elif self._changed():
                    self._points = self._read()
            except OSError:
                self._stop_watching()  # read afresh next time
                return ()
            return self._points

    def close(self) -> None:
        with self._lock:
            self._stop_watching()

    def _start_watching(self) -> None:
        self._watched = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        self._watch.register(self._watched, select.POLLPRI)
        self._points = self._read()

    def _stop_watching(self) -> None:
        if self._watched is not None:
            self._watch.unregister(self._watched)
            os.close(self._watched)
            self._watched = None

    def _changed(self) -> bool:
        return any(events & CHANGED for _fd, events in self._watch.poll(0))

    def _read(self) -> tuple[str, ...]:
        with open(self._path) as mountinfo:
            return mount_points(mountinfo.read())


_host_mounts = MountTable()


def host_mount_points() -> tuple[str, ...]:
    """This host's mount points (none when they cannot be read: nothing is then hidden)."""
    return _host_mounts.points()


def spec_hidden_from_sandbox(spec: SandboxSpec) -> str | None:
    """`hidden_from_sandbox` for a spec, against this host's mounts."""
    return hidden_from_sandbox(
        spec.name,
        command=spec.command[0],
        directory=spec.directory,
        search_path=spec.environment.get("PATH", DEFAULT_PATH),
        binds=spec.binds,
        host_mounts=host_mount_points(),
    )
