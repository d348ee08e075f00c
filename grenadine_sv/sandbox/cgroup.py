"""A cgroup (v2) per program: the kernel's own list of every process of a program.

Membership is kept by the kernel, not by a file written after the fact: a sandbox's launcher
joins its program's cgroup before it forks the program, every descendant inherits it, and CRIU
restores a process into the cgroup it was dumped from. So `cgroup.procs` lists a program's
processes whatever the supervisor managed to record, and a new supervisor finds them there.

Only the cgroup v2 hierarchy is used, without controllers: on a hybrid host it is mounted at
/sys/fs/cgroup/unified, on a pure v2 host at /sys/fs/cgroup. Under a systemd unit
(Delegate=yes) the programs' cgroups go under the unit's own cgroup; otherwise under
`grenadine-sv` at the hierarchy's root. One subtree per state_dir, so that two supervisors never
share a program's cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
OWN_CGROUP = Path("/proc/self/cgroup")
TOP_LEVEL = "grenadine-sv"
PROGRAM_PREFIX = "program-"
DEFINITION_XATTR = "trusted.grenadine_sv.definition"
RESTORER_XATTR = "trusted.grenadine_sv.restorer"


class CgroupUnavailable(Exception):
    """No writable cgroup v2 hierarchy here; the message says why."""


def v2_mount_point(mountinfo: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (the first cgroup2 mount), if anywhere."""
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            escaped = before.split()[4]
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), escaped))
    return None


def own_v2_path(proc_cgroup: str) -> str:
    """This process's cgroup in the v2 hierarchy ("0::/path" in /proc/self/cgroup)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return "/"


def subtree_for(mount: Path, own: str, state_dir: Path) -> Path:
    """The cgroup holding this supervisor's programs."""
    in_unit = own.rstrip("/").endswith(".service")  # a systemd unit's delegated subtree
    parent = mount / own.strip("/") if in_unit else mount / TOP_LEVEL
    key = hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]
    return parent / f"sv-{key}"


@dataclass(frozen=True)
class ProgramCgroup:
    """One program's cgroup (created on demand)."""

    path: Path

    @property
    def program(self) -> str:
        return self.path.name.removeprefix(PROGRAM_PREFIX)

    def ensure(self) -> None:
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)

    def hierarchy_path(self) -> str:
        """Its path from the root of the cgroup v2 hierarchy (as /proc/PID/cgroup shows it)."""
        mount = v2_mount_point(MOUNTINFO.read_text())
        if mount is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        return "/" + self.path.relative_to(mount).as_posix()

    def pids(self) -> list[int]:
        # os.read rather than Path.read_text: a third of the system calls, and the supervisor
        # reads every running program's list every 2 s (membership.CopyCensus).
        try:
            fd = os.open(self.path / "cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return [int(pid) for pid in b"".join(chunks).split()]

    def join(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def kill(self) -> None:
        """SIGKILL every process in it (cgroup.kill; one by one on kernels before 5.14)."""
        try:
            (self.path / "cgroup.kill").write_text("1\n")
        except FileNotFoundError:
            if not self.path.exists():
                return
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove it if it is empty (a crash leaves nothing worse than an empty directory);
        True when it was removed."""
        try:
            self.path.rmdir()
        except OSError:
            return False
        return True

    def set_definition(self, digest: str) -> None:
        """Record which definition runs in it, before anything runs (kept by the kernel)."""
        os.setxattr(self.path, DEFINITION_XATTR, digest.encode())

    def definition(self) -> str | None:
        return self._get(DEFINITION_XATTR)

    def set_restorer(self, pid: int, start_time: int) -> None:
        """Record the CRIU process restoring into it, for a supervisor that starts meanwhile."""
        os.setxattr(self.path, RESTORER_XATTR, f"{pid} {start_time}".encode())

    def clear_restorer(self) -> None:
        with contextlib.suppress(OSError):
            os.removexattr(self.path, RESTORER_XATTR)

    def restorer(self) -> tuple[int, int] | None:
        value = self._get(RESTORER_XATTR)
        if value is None:
            return None
        with contextlib.suppress(ValueError):
            pid, start_time = value.split()
            return int(pid), int(start_time)
        return None

    def _get(self, name: str) -> str | None:
        try:
            return os.getxattr(self.path, name).decode()
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP):
                return None
            raise


@dataclass(frozen=True)
class ProgramCgroups:
    """The cgroups of one supervisor's programs."""

    root: Path

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> ProgramCgroups:
        try:
            mount = v2_mount_point(MOUNTINFO.read_text())
            own = own_v2_path(OWN_CGROUP.read_text())
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from exc
        if mount is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        root = subtree_for(mount, own, state_dir)
        try:
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create the cgroup {root}: {exc.strerror}") from exc
        return cls(root)

    def of(self, program: str) -> ProgramCgroup:
        return ProgramCgroup(self.root / f"{PROGRAM_PREFIX}{program}")

    def existing(self) -> Iterator[ProgramCgroup]:
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.root.iterdir()):
                if entry.is_dir() and entry.name.startswith(PROGRAM_PREFIX):
                    yield ProgramCgroup(entry)

    def remove_empty_programs(self) -> list[str]:
        """Remove the programs' cgroups that hold no process; returns their programs."""
        return [cgroup.program for cgroup in list(self.existing()) if cgroup.remove()]

    def remove_empty(self) -> None:
        self.remove_empty_programs()
        with contextlib.suppress(OSError):
            self.root.rmdir()
