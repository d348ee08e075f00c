"""File descriptors CRIU cannot dump, found in a live process tree's /proc.

CRIU's log names no file when such a descriptor stops a dump (an io_uring instance fails in
the parasite as ``send_fds failed (-22)``), so the cause is looked up in the tree itself,
which runs on after a failed dump."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# What /proc/PID/fd/N links to, for descriptors CRIU 4 cannot dump -> what they are.
UNDUMPABLE_LINKS = {"anon_inode:[io_uring]": "an io_uring instance"}


def children(pid: int) -> list[int]:
    """The child processes of `pid` (of all its threads); [] when it is gone."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def undumpable_fds(root_pid: int) -> list[str]:
    """`pid 42 (nginx) holds fd 7, an io_uring instance` for each such descriptor of the
    tree rooted at `root_pid`."""
    found: list[str] = []
    pending, seen = [root_pid], set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.extend(_undumpable_of(pid))
        pending.extend(children(pid))
    return found


def _undumpable_of(pid: int) -> list[str]:
    try:
        command = Path(f"/proc/{pid}/comm").read_text().strip()
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    found = []
    for fd in sorted(fds, key=int):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            what = UNDUMPABLE_LINKS.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            if what is not None:
                found.append(f"pid {pid} ({command}) holds fd {fd}, {what}")
    return found
