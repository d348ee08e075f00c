"""The few Linux facts the supervisor side needs: child-subreaper status and process identity."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_libc = ctypes.CDLL(None, use_errno=True)


def set_child_subreaper(enabled: bool) -> None:
    """Make orphaned descendants re-parent to this process (or stop doing so)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(enabled)), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(code)}")


def become_subreaper() -> None:
    """Adopt orphaned descendants, so sandboxed programs become this process's children."""
    set_child_subreaper(True)


def is_subreaper() -> bool:
    flag = ctypes.c_int(0)
    if _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_GET_CHILD_SUBREAPER) failed: {os.strerror(code)}")
    return flag.value != 0


def set_process_name(name: str) -> None:
    """Set this process's comm (at most 15 bytes), so `pidof NAME` finds it."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


# Indexes into stat_fields (field N of proc(5) is index N - 3).
STAT_STATE = 0
STAT_SESSION = 3
STAT_FLAGS = 6
STAT_START_TIME = 19


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may itself hold spaces and
    parentheses): the state first. OSError when there is no such process."""
    with open(f"/proc/{pid}/stat", errors="replace") as stat:  # a name of any bytes
        text = stat.read()
    return text[text.rindex(")") + 2 :].split()


def read_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot (pid reuse detector)."""
    return int(stat_fields(pid)[STAT_START_TIME])


def read_pid_ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


def pids_in_pid_namespace(ns_inode: int) -> list[int]:
    """Host pids of every process whose PID namespace is `ns_inode` (a sandbox's processes)."""
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == ns_inode:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # ended meanwhile
    return found


def resume_sandbox(root_pid: int) -> int:
    """Send SIGCONT to every process of the sandbox whose PID 1 is `root_pid` (a dump with
    leave_stopped leaves each one stopped); returns how many were sent one."""
    try:
        ns_inode = read_pid_ns_inode(root_pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    if ns_inode == read_pid_ns_inode(os.getpid()):
        raise ValueError(f"pid {root_pid} is not in a sandbox of its own")
    resumed = 0
    for pid in pids_in_pid_namespace(ns_inode):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            continue
        resumed += 1
    return resumed


def own_children() -> list[int]:
    """This process's children: every thread's (a child is listed under the thread that
    forked it, and orphans re-parented to this subreaper under its main thread)."""
    children: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as listing:
                children.extend(int(pid) for pid in listing.read().split())
        except OSError:  # the thread ended meanwhile
            continue
    return children


def kill_and_reap(pid: int) -> None:
    """SIGKILL a child of this process and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
