"""Which processes are an instance of a program: counted from the kernel, never from a file.

An instance is a sandbox: a PID namespace whose PID 1 is in the program's cgroup. Anything else
in that cgroup (another sandbox, a process left in the supervisor's own namespace) is not the
instance the supervisor runs, and is ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from grenadine_sv.sandbox.cgroup import ProgramCgroup
from grenadine_sv.sandbox.linux import read_pid_ns_inode, read_start_time

log = structlog.get_logger()

EMPTY_WAIT_SECONDS = 10.0
# How often the running programs' cgroups are checked for a copy that is not their instance:
# this often after a change, then less and less often while nothing changes (CensusCadence).
CENSUS_SECONDS = 2.0
CENSUS_MAX_SECONDS = 16.0
POLL_SECONDS = 0.02
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Sandbox:
    """One instance found in a cgroup."""

    root: int
    """Host pid of the namespace's PID 1."""
    start_time: int
    pid_ns_inode: int


def namespace_pids(pid: int) -> list[int]:
    """The pids of `pid` in each PID namespace it is in, outermost first (NSpid); empty
    when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return [int(field) for field in line.split()[1:]]
    return []


def census(cgroup: ProgramCgroup) -> tuple[list[Sandbox], list[int]]:
    """The sandboxes in `cgroup` (one per PID namespace directly below this process's, with
    its PID 1 there) and the other processes in it (strays). Processes in namespaces nested
    deeper belong to a sandbox (a program may make its own) and count as neither."""
    own_depth = len(namespace_pids(os.getpid()))
    by_namespace: dict[int, list[int]] = {}
    strays: list[int] = []
    for pid in cgroup.pids():
        depth = len(namespace_pids(pid)) - own_depth
        try:
            namespace = read_pid_ns_inode(pid)
        except OSError:
            continue  # gone meanwhile
        if depth <= 0:
            strays.append(pid)
        elif depth == 1:
            by_namespace.setdefault(namespace, []).append(pid)
    sandboxes: list[Sandbox] = []
    for namespace, pids in by_namespace.items():
        root = next((pid for pid in pids if namespace_pids(pid)[-1:] == [1]), None)
        if root is None:
            strays.extend(pids)
            continue
        with contextlib.suppress(OSError, ValueError):
            sandboxes.append(Sandbox(root, read_start_time(root), namespace))
    return sandboxes, strays


def end_processes(pids: Iterable[int]) -> None:
    """SIGKILL (a sandbox's PID 1 takes its whole namespace with it)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def end_all_but(cgroup: ProgramCgroup, pid_ns_inode: int) -> list[int]:
    """End every process of `cgroup` outside the PID namespace `pid_ns_inode` (the instance
    the supervisor runs); returns the pids ended."""
    sandboxes, strays = census(cgroup)
    ended = [s.root for s in sandboxes if s.pid_ns_inode != pid_ns_inode] + strays
    end_processes(ended)
    return ended


def all_in_namespace(pids: Iterable[int], pid_ns_inode: int) -> bool:
    """Whether every one of `pids` is in the PID namespace `pid_ns_inode` (one stat each,
    where the full census reads three files per process); False when one is gone."""
    try:
        return all(read_pid_ns_inode(pid) == pid_ns_inode for pid in pids)
    except OSError:
        return False


@dataclass
class CopyCensus:
    """Ends what runs beside each running instance in its program's cgroup, looking into a
    cgroup again only when its processes changed since a look that found nothing to end,
    and taking the full census only when one of them is outside the instance's namespace:
    the full census reads every process's /proc entries, which for 50 idle programs every
    2 s was most of an idle supervisor's CPU."""

    _settled: dict[tuple[Path, int], frozenset[int]] = field(default_factory=dict)

    def end_copies(self, instances: Iterable[tuple[ProgramCgroup, int]]) -> dict[str, list[int]]:
        """For each (cgroup, PID namespace of its instance): the pids ended, by program."""
        ended: dict[str, list[int]] = {}
        settled: dict[tuple[Path, int], frozenset[int]] = {}
        for cgroup, pid_ns_inode in instances:
            key = (cgroup.path, pid_ns_inode)
            try:
                pids = frozenset(cgroup.pids())
            except OSError:
                continue
            if self._settled.get(key) != pids and not all_in_namespace(pids, pid_ns_inode):
                extra = end_all_but(cgroup, pid_ns_inode)
                if extra:
                    ended[cgroup.program] = extra
                    continue
            settled[key] = pids
        self._settled = settled
        return ended


class CensusCadence:
    """How long to wait before the next census: CENSUS_SECONDS after a change (an instance
    started, restarted, restored, taken back, or a copy ended), when a late CRIU restore
    can leave a copy, and twice as long after each census that found the same instances
    and nothing to end, up to CENSUS_MAX_SECONDS: 50 idle programs are then looked at every
    16 s rather than every 2 s, most of what an idle supervisor did."""

    def __init__(self) -> None:
        self._instances: list[tuple[Path, int]] | None = None
        self.seconds = CENSUS_SECONDS

    def after(self, instances: list[tuple[Path, int]], ended: bool) -> float:
        """The wait before the next census, given the instances this one looked at."""
        if ended or instances != self._instances:
            self.seconds = CENSUS_SECONDS
        else:
            self.seconds = min(self.seconds * 2, CENSUS_MAX_SECONDS)
        self._instances = instances
        return self.seconds


async def emptied(cgroup: ProgramCgroup, timeout: float = EMPTY_WAIT_SECONDS) -> None:
    """Kill everything in `cgroup` and wait until it holds no process."""
    if not cgroup.pids():
        return
    cgroup.kill()
    with trio.move_on_after(timeout):
        while cgroup.pids():
            await trio.sleep(POLL_SECONDS)
        return
    raise OSError(f"processes of cgroup {cgroup.path} did not end within {timeout:g} s")


def instance_pids(cgroup: ProgramCgroup | None, pid_ns_inode: int) -> list[int]:
    """The processes of the instance whose PID namespace is `pid_ns_inode`."""
    candidates: Iterable[int]
    if cgroup is not None:
        candidates = cgroup.pids()
    else:
        candidates = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    found = []
    for pid in candidates:
        with contextlib.suppress(OSError):
            if read_pid_ns_inode(pid) == pid_ns_inode:
                found.append(pid)
    return found


def listening_socket_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` (any address) in this network namespace."""
    inodes: set[int] = set()
    for table in TCP_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            listening = len(fields) > 9 and fields[3] == TCP_LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def holds_any_socket(pids: Iterable[int], inodes: set[int]) -> bool:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return True
    return False


def instance_listens_on(port: int, cgroup: ProgramCgroup | None, pid_ns_inode: int) -> bool:
    """True when a process of this instance holds a socket listening on `port`."""
    inodes = listening_socket_inodes(port)
    return bool(inodes) and holds_any_socket(instance_pids(cgroup, pid_ns_inode), inodes)


async def claim(
    cgroup: ProgramCgroup, definition_digest: str, program: str, threads: trio.CapacityLimiter
) -> None:
    """Before an instance starts: `cgroup` exists (made on one of `threads`), holds no
    process (a stray copy is ended) and records the definition about to run."""
    await trio.to_thread.run_sync(cgroup.ensure, limiter=threads)
    strays = cgroup.pids()
    if strays:
        log.warning("stray_processes_ended", program=program, pids=strays, cgroup=str(cgroup.path))
        await emptied(cgroup)
    cgroup.set_definition(definition_digest)


def move_into(cgroup: ProgramCgroup, root_pid: int, pid_ns_inode: int) -> None:
    """Move an instance into `cgroup` unless it is there (a restored instance whose image
    predates cgroups lands outside)."""
    if root_pid in cgroup.pids():
        return
    for pid in instance_pids(None, pid_ns_inode):
        with contextlib.suppress(OSError):  # gone meanwhile
            cgroup.join(pid)
