"""What a test's supervisors leave behind, found and ended by pid.

A supervisor that shuts down ends its programs, its stdio keeper and its programs' cgroups. A
supervisor killed with SIGKILL ends none of them: the next supervisor on the same state_dir
takes them back, and when no next one comes (the test ends), `end_leftovers` does. The
session check (tests/conftest.py) finds what the tests left anyway: every process the tests
start carries SESSION_VARIABLE in its environment (programs inherit the supervisor's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from grenadine_sv.keeper.client import SOCKET_NAME
from grenadine_sv.sandbox.cgroup import (
    MOUNTINFO,
    OWN_CGROUP,
    own_v2_path,
    subtree_for,
    v2_mount_point,
)

SESSION_VARIABLE = "GRENADINE_SV_TEST_SESSION"
KEEPER_NAME = "grenadine-keep"
END_WAIT_SECONDS = 10.0


@dataclass
class Leftovers:
    """What one state_dir's supervisors left: keeper pids, program pids, cgroup directories."""

    keepers: list[int] = field(default_factory=list)
    programs: list[int] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.keepers or self.programs or self.cgroups)

    def describe(self) -> str:
        return (
            f"stdio keepers {self.keepers}, program processes {self.programs}, "
            f"cgroups {[str(path) for path in self.cgroups]}"
        )


def cgroup_subtree(state_dir: Path) -> Path | None:
    """The cgroup directory a supervisor on `state_dir` puts its programs under."""
    try:
        mount = v2_mount_point(MOUNTINFO.read_text())
        own = own_v2_path(OWN_CGROUP.read_text())
    except OSError:
        return None
    return subtree_for(mount, own, state_dir) if mount is not None else None


def unix_socket_paths() -> dict[str, str]:
    """Bound unix sockets by inode, from /proc/net/unix (a deleted path is still listed)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8:
                paths[fields[6]] = fields[7]
    return paths


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def keepers_of(state_dir: Path) -> list[int]:
    """The stdio keepers listening on `state_dir`'s keeper socket."""
    wanted = os.fspath(state_dir.resolve() / SOCKET_NAME)
    paths = unix_socket_paths()
    found = []
    for pid in all_pids():
        if process_name(pid) != KEEPER_NAME:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and paths.get(target[8:-1]) == wanted:
                    found.append(pid)
                    break
    return found


def cgroups_of(state_dir: Path) -> list[Path]:
    """`state_dir`'s cgroup subtree and the program cgroups in it, deepest first."""
    subtree = cgroup_subtree(state_dir)
    if subtree is None or not subtree.is_dir():
        return []
    return [*sorted(p for p in subtree.iterdir() if p.is_dir()), subtree]


def cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def find_leftovers(state_dir: Path) -> Leftovers:
    cgroups = cgroups_of(state_dir)
    return Leftovers(
        keepers=keepers_of(state_dir),
        programs=[pid for cgroup in cgroups for pid in cgroup_pids(cgroup)],
        cgroups=cgroups,
    )


def alive(pid: int) -> bool:
    """True until the process has exited (a zombie counts as gone); reaps it when it is ours
    (this process is a child subreaper once a test ran a supervisor in it)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def end_pids(pids: list[int]) -> None:
    """SIGKILL each of `pids` and wait, bounded, until each is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + END_WAIT_SECONDS
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"still running {END_WAIT_SECONDS}s after SIGKILL: {pids}")
        time.sleep(0.02)


def end_leftovers(state_dir: Path) -> Leftovers:
    """End what supervisors on `state_dir` left (its keeper, the processes in its programs'
    cgroups) by pid, remove those cgroups, and return what there was."""
    found = find_leftovers(state_dir)
    end_pids(found.keepers + found.programs)
    for cgroup in found.cgroups:
        deadline = time.monotonic() + END_WAIT_SECONDS
        while True:
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                # A process SIGKILLed a moment ago may still be leaving the cgroup.
                if time.monotonic() > deadline:
                    raise
                end_pids(cgroup_pids(cgroup))
                time.sleep(0.02)
    return found


def settled_leftovers(state_dir: Path, bound: float = END_WAIT_SECONDS) -> Leftovers:
    """What is still left `bound` seconds at most after a test: a keeper told to quit, or a
    cgroup being removed, may need a moment to be gone."""
    deadline = time.monotonic() + bound
    while (found := find_leftovers(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def session_processes(session: str) -> list[int]:
    """Processes other than this one whose environment names this test session."""
    marker = f"{SESSION_VARIABLE}={session}".encode()
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and alive(pid):
                found.append(pid)
    return found
