"""Facts about a finished dump, read from CRIU's image files with pycriu (no log parsing).

pycriu is untyped and reports bad input with any exception type; it is confined to
`_load_entries`, and everything it returns is checked and converted to typed values at once.
pycriu is imported only when images are read, so the image store works without it.
"""

from __future__ import annotations

import os
import quopri
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TCP_LISTEN = 10  # a listening socket's state, unix ones included
STDIO_FDS: Mapping[int, str] = {1: "stdout", 2: "stderr"}
# CRIU's task states (criu/include/pid.h) of a task that had exited: TASK_DEAD, as it dumps a
# zombie, and TASK_ZOMBIE.
EXITED_TASK_STATES = frozenset({0x2, 0x6})


class ImageFactsError(Exception):
    """A CRIU image file is missing or cannot be decoded."""


@dataclass(frozen=True)
class DumpFacts:
    """What CRIU's images say about the process tree it dumped."""

    root_pid: int
    """PID of the dumped tree's root, as CRIU saw it (inside its PID namespace, if any)."""
    comm: str
    """The program's command name: the root's, or with an init its child's."""
    memory_bytes: int
    """Memory pages dumped, all processes of the tree together."""
    stdio_pipes: Mapping[str, int]
    """{"stdout": pipe inode, "stderr": pipe inode} of the root task, for those that are pipes."""
    dump_stats: Mapping[str, int]
    """CRIU's stats-dump (times in µs, counts in pages); empty if CRIU wrote none here."""


def read_dump_facts(criu_dir: Path, *, under_init: bool = False) -> DumpFacts:
    """Read what the image listing and the metrics need from the dump in `criu_dir`.

    With `under_init` the root is the sandbox's init, and the program is its first child."""
    tree = _tree(criu_dir)
    pids = list(tree)
    root_pid = pids[0]
    program_pid = root_pid
    if under_init:
        program_pid = next((pid for pid, ppid in tree.items() if ppid == root_pid), root_pid)
    task_core = _task_core(criu_dir, program_pid)
    if task_core.get("task_state") in EXITED_TASK_STATES:
        raise ImageFactsError(
            "the program exited while CRIU dumped it (it is a zombie in the image, pid "
            f"{program_pid}): there is nothing to restore"
        )
    return DumpFacts(
        root_pid=root_pid,
        comm=_comm(task_core, criu_dir / f"core-{program_pid}.img"),
        memory_bytes=sum(_dumped_pages(criu_dir, pid) for pid in pids) * PAGE_SIZE,
        stdio_pipes=_stdio_pipes(criu_dir, root_pid),
        dump_stats=_dump_stats(criu_dir),
    )


def _tree(criu_dir: Path) -> dict[int, int]:
    """pid -> parent pid of every process of the dump, the root first."""
    path = criu_dir / "pstree.img"
    tree = {
        _int(entry, "pid", path): _int(entry, "ppid", path, default=0)
        for entry in _load_entries(path, "PSTREE")
    }
    if not tree:
        raise ImageFactsError(f"{path} lists no process")
    return tree


def _task_core(criu_dir: Path, pid: int) -> dict[str, Any]:
    """The task's core entry (tc: command name, task state, exit code...)."""
    path = criu_dir / f"core-{pid}.img"
    entries = _load_entries(path, "CORE")
    return _dict(entries[0] if entries else None, "tc", path)


def _comm(task_core: Mapping[str, Any], path: Path) -> str:
    comm = task_core.get("comm")
    if not isinstance(comm, str):
        raise ImageFactsError(f"{path} has no command name (tc.comm)")
    return comm


def _dumped_pages(criu_dir: Path, pid: int) -> int:
    path = criu_dir / f"pagemap-{pid}.img"
    if not path.exists() and _task_core(criu_dir, pid).get("task_state") in EXITED_TASK_STATES:
        return 0  # a zombie: CRIU dumps its exit code, and no memory
    # The first entry is the pagemap head (which pages-N.img holds the pages); the rest are
    # runs of pages. Images from before CRIU 3.x carry the count in compat_nr_pages.
    return sum(
        _int(entry, "nr_pages", path, default=0) or _int(entry, "compat_nr_pages", path, default=0)
        for entry in _load_entries(path, "PAGEMAP")[1:]
    )


def listening_unix_sockets(criu_dir: Path) -> list[str]:
    """The paths that the dump's listening unix sockets were bound to (CRIU restores each
    there, whatever the program renamed it to after bind)."""
    path = criu_dir / "files.img"
    found = []
    for entry in _load_entries(path, "FILES"):
        socket_entry = entry.get("usk")
        if entry.get("type") != "UNIXSK" or not isinstance(socket_entry, dict):
            continue
        name = socket_entry.get("name")
        if socket_entry.get("state") != TCP_LISTEN or not isinstance(name, str):
            continue
        # pycriu writes unix socket names quoted-printable; the kernel's carry a final NUL.
        raw = quopri.decodestring(name.encode()).rstrip(b"\0")
        if raw.startswith(b"/"):
            found.append(os.fsdecode(raw))
    return found


def _stdio_pipes(criu_dir: Path, pid: int) -> dict[str, int]:
    ids_path = criu_dir / f"ids-{pid}.img"
    ids = _load_entries(ids_path, "IDS")
    files_id = _int(ids[0] if ids else {}, "files_id", ids_path)
    fdinfo_path = criu_dir / f"fdinfo-{files_id}.img"
    file_ids = {
        _int(entry, "fd", fdinfo_path): _int(entry, "id", fdinfo_path)
        for entry in _load_entries(fdinfo_path, "FDINFO")
    }
    files_path = criu_dir / "files.img"
    pipe_inodes = {
        _int(entry, "id", files_path): _int(_dict(entry, "pipe", files_path), "pipe_id", files_path)
        for entry in _load_entries(files_path, "FILES")
        if entry.get("type") == "PIPE"
    }
    return {
        name: pipe_inodes[file_ids[fd]]
        for fd, name in STDIO_FDS.items()
        if fd in file_ids and file_ids[fd] in pipe_inodes
    }


def _dump_stats(criu_dir: Path) -> dict[str, int]:
    path = criu_dir / "stats-dump"
    if not path.exists():
        return {}
    entries = _load_entries(path, "STATS")
    dump = _dict(entries[0] if entries else None, "dump", path)
    return {
        key: value
        for key, value in dump.items()
        if isinstance(value, int) and not isinstance(value, bool)
    }


def _load_entries(path: Path, magic: str) -> list[dict[str, Any]]:
    """The entries of one CRIU image file, each a dict as pycriu decodes it."""
    import pycriu.images

    try:
        with path.open("rb") as file:
            image = pycriu.images.load(file)
    except FileNotFoundError:
        raise ImageFactsError(f"CRIU image file {path} is missing") from None
    except Exception as exc:  # pycriu raises bare Exception, struct.error, DecodeError...
        raise ImageFactsError(f"cannot decode CRIU image file {path}: {exc!r}") from exc
    if not isinstance(image, dict) or image.get("magic") != magic:
        found = image.get("magic") if isinstance(image, dict) else None
        raise ImageFactsError(f"{path} is not a {magic} image (magic {found!r})")
    entries = image.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImageFactsError(f"{path}: pycriu returned no list of entries")
    return entries


def _int(entry: Mapping[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = entry.get(key, default)
    if value is None:
        raise ImageFactsError(f"{path}: an entry lacks the field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ImageFactsError(f"{path}: field {key!r} is {value!r}, expected an integer")
    return value


def _dict(entry: Mapping[str, Any] | None, key: str, path: Path) -> dict[str, Any]:
    value = None if entry is None else entry.get(key)
    if not isinstance(value, dict):
        raise ImageFactsError(f"{path}: no {key!r} record")
    return value
