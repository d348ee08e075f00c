"""What the chaos harness learns from the kernel and the file system, never from the supervisor's
own records: the instances of each program, the CRIU processes a supervisor runs, and from
those the phase a checkpoint or restore is in."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class Instance:
    """A live process of a program, found by the marker in its command line."""

    pid: int
    ppid: int
    state: str
    pid_ns: int
    ns_pid: int
    """Its pid inside its own PID namespace (1 for a sandbox's root)."""
    cgroup: str
    """Its cgroup v2 path (the `0::` line of /proc/PID/cgroup), "" when it has none."""


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:
        return None


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...], None when gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    return text.rsplit(")", 1)[1].split()


def comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "").strip()


def start_time(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def instances(run: str, name: str) -> list[Instance]:
    """Every live (not zombie) process whose command line names this run and program."""
    wanted = ["--name", name, "--run", run]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        cmdline = _read(f"/proc/{pid}/cmdline")
        if not cmdline:
            continue
        argv = cmdline.split("\0")
        if not _contains(argv, wanted):
            continue
        fields = stat_fields(pid)
        status = _read(f"/proc/{pid}/status")
        if fields is None or status is None or fields[0] in ("Z", "X"):
            continue
        ns_pids = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
        )
        try:
            pid_ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        except OSError:
            continue
        found.append(
            Instance(
                pid=pid,
                ppid=int(fields[1]),
                state=fields[0],
                pid_ns=pid_ns,
                ns_pid=int(ns_pids[-1]) if ns_pids else pid,
                cgroup=cgroup_v2_path(pid),
            )
        )
    return found


@dataclass(frozen=True)
class Sandbox:
    """One instance of a program: its processes that share a PID namespace (an init such as
    tini as the namespace's PID 1, the program under it)."""

    pid_ns: int
    members: tuple[Instance, ...]

    @property
    def root(self) -> Instance | None:
        """The namespace's PID 1 (what the supervisor waits for)."""
        return next((m for m in self.members if m.ns_pid == 1), None)

    def describe(self) -> str:
        return (
            "["
            + ", ".join(
                f"pid {m.pid} (ns pid {m.ns_pid}, parent {m.ppid}, {m.state})" for m in self.members
            )
            + "]"
        )


def sandboxes(run: str, name: str) -> list[Sandbox]:
    """The instances of a program, counted by PID namespace."""
    by_ns: dict[int, list[Instance]] = {}
    for instance in instances(run, name):
        by_ns.setdefault(instance.pid_ns, []).append(instance)
    return [
        Sandbox(ns, tuple(sorted(members, key=lambda m: m.ns_pid)))
        for ns, members in sorted(by_ns.items())
    ]


def _contains(argv: list[str], wanted: list[str]) -> bool:
    return any(argv[i : i + len(wanted)] == wanted for i in range(len(argv)))


def cgroup_v2_path(pid: int) -> str:
    text = _read(f"/proc/{pid}/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def cgroup_members(cgroup: str) -> list[int] | None:
    """Pids in a cgroup v2 directory (hybrid hosts mount it at /sys/fs/cgroup/unified)."""
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        text = _read(f"{mount}{cgroup}/cgroup.procs")
        if text is not None and os.path.exists(f"{mount}/cgroup.controllers"):
            return [int(p) for p in text.split()]
        if text is not None and mount.endswith("unified"):
            return [int(p) for p in text.split()]
    return None


def children(pid: int) -> list[int]:
    """Direct children of `pid`, over all its threads (a worker thread forks CRIU)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = _read(f"/proc/{pid}/task/{task}/children")
            if text:
                found.extend(int(child) for child in text.split())
    return found


def criu_children(supervisor_pid: int, criu_binary: Path) -> list[int]:
    """CRIU processes the supervisor runs (found by executable: CRIU rewrites its argv)."""
    found = []
    for child in children(supervisor_pid):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{child}/exe")) == criu_binary:
                found.append(child)
    return found


def is_lazy_pages_daemon(pid: int) -> bool:
    """Whether a CRIU process is a `criu lazy-pages` daemon serving a lazy restore's memory."""
    return b"lazy-pages" in (_read_bytes(f"/proc/{pid}/cmdline") or b"").split(b"\0")


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


def partial_images(state_dir: Path) -> list[Path]:
    """Dumps in progress or being sealed: `.partial-ID` directories of the image store."""
    images = state_dir / "images"
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for program in images.iterdir():
            with contextlib.suppress(OSError):
                found.extend(p for p in program.iterdir() if p.name.startswith(PARTIAL_PREFIX))
    return found


@dataclass(frozen=True)
class Phase:
    """Where a supervisor is, as far as CRIU goes, at one instant."""

    criu: tuple[int, ...]
    """Every CRIU process the supervisor runs, lazy-pages daemons included."""
    lazy: tuple[int, ...]
    """The lazy-pages daemons among them (a lazy restore's memory still being served)."""
    partials: tuple[Path, ...]
    dumped: bool
    """A partial image holds CRIU's `stats-dump`, which CRIU writes when its dump is done."""
    sealed_meta: bool
    """A partial image already holds its meta.json (sealing is about to publish it)."""

    @property
    def label(self) -> str:
        """ "dump" while CRIU runs with a partial image open; "sealing" once CRIU is done and
        the partial image is being hashed, fsynced and published; "restore" while CRIU runs
        with no partial image; "lazy" while only lazy-pages daemons run (a lazily restored
        program already runs, its memory still being served); "elsewhere" otherwise."""
        working = set(self.criu) - set(self.lazy)
        if working and self.partials:
            return "dump"
        if self.partials and self.dumped:
            return "sealing"
        if working:
            return "restore"
        if self.lazy:
            return "lazy"
        return "elsewhere"


def observe(supervisor_pid: int, state_dir: Path, criu_binary: Path) -> Phase:
    partials = partial_images(state_dir)
    criu = tuple(criu_children(supervisor_pid, criu_binary))
    return Phase(
        criu=criu,
        lazy=tuple(pid for pid in criu if is_lazy_pages_daemon(pid)),
        partials=tuple(partials),
        dumped=any((p / "criu" / "stats-dump").exists() for p in partials),
        sealed_meta=any((p / "meta.json").exists() for p in partials),
    )
