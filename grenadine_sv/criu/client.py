"""CRIU through pycriu (swrk mode): dump and restore a sandboxed program. Blocking calls:
run them off the trio loop (trio.to_thread)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grenadine_sv.criu.diagnosis import advice_for, cause_lines
from grenadine_sv.criu.notify import PostDumpFailed, dump_with_notifications
from grenadine_sv.criu.options import CriuOptions, apply_options
from grenadine_sv.criu.undumpable import children, undumpable_fds
from grenadine_sv.sandbox.linux import (
    STAT_FLAGS,
    STAT_SESSION,
    STAT_STATE,
    kill_and_reap,
    own_children,
    stat_fields,
)

if TYPE_CHECKING:
    import pycriu

# pycriu (with protobuf and every CRIU image message, ~5 MiB) is imported by the first dump
# or restore: a supervisor whose programs are never checkpointed does without it.
LOG_LEVEL = 4
SWRK_EXIT_SECONDS = 30.0


class CriuError(Exception):
    """CRIU refused or failed; the message carries CRIU's own error lines (the cause first)
    and, when one applies, what to change in the configuration."""

    def __init__(self, action: str, detail: str, log_path: Path | None) -> None:
        where = f" (full log: {log_path})" if log_path is not None else ""
        advice = advice_for(detail.split("; "))
        todo = f"; to fix: {'; '.join(advice)}" if advice else ""
        super().__init__(f"criu {action} failed: {detail}{todo}{where}")
        self.action = action
        self.detail = detail
        self.advice = advice
        self.log_path = log_path


@dataclass(frozen=True)
class DumpRequest:
    """What `criu dump` is asked to do, and where it writes the image."""

    pid: int
    images_dir: Path
    leave_running: bool
    options: CriuOptions = field(default_factory=CriuOptions)
    # Mount point inside the sandbox -> the name CRIU records it under, for a restore to
    # bind a directory of its choosing there (other bind mounts are recorded by host path).
    external_mounts: Mapping[str, str] = field(default_factory=dict)
    # The tasks stay frozen after the dump (and TCP connections locked) until the caller
    # resumes them with SIGCONT or kills them: the dump never outlives its program unlisted.
    leave_stopped: bool = False
    # Run while the dumped tasks are still frozen, the image complete (CRIU's post-dump
    # notification); if it raises, the dump fails and the tasks are resumed.
    on_post_dump: Callable[[], None] | None = None
    log_name: str = "dump.log"
    # Fds the CRIU process holds open while it runs (the state_dir lock: a supervisor killed
    # meanwhile is not replaced before CRIU has finished).
    hold_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class RestoreRequest:
    """What `criu restore` is asked to do, and from which image."""

    images_dir: Path
    # Where CRIU writes its restore log (never the image, which stays as dumped).
    work_dir: Path
    # "pipe:[INODE]" (the pipe at dump time) -> an inheritable fd of this process.
    inherit_fds: Mapping[str, int]
    options: CriuOptions = field(default_factory=CriuOptions)
    # Name of an external mount in the image -> the host directory bound in its place.
    external_mounts: Mapping[str, str] = field(default_factory=dict)
    log_name: str = "restore.log"
    lazy_pages: bool = False
    """Leave anonymous memory to a lazy-pages daemon listening in work_dir (post-copy)."""
    # Called with the CRIU process's pid before it is asked to restore.
    on_criu_started: Callable[[int], None] | None = None
    # The cgroup (its path from the root of the cgroup hierarchy) the tree is restored into,
    # whichever cgroup it was dumped from (another state_dir's, another host's); else CRIU
    # makes the cgroup it was dumped from again.
    cgroup_root: str | None = None


def error_lines(log_path: Path) -> list[str]:
    """CRIU's own error messages from its log, the cause first (see diagnosis.cause_lines)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return cause_lines(text)


@dataclass
class _Session:
    """One `criu swrk` child and the pycriu client speaking to it."""

    client: Any
    process: subprocess.Popen[bytes]
    sock: socket.socket
    # Children of the calling thread before CRIU ran (a restore makes new ones).
    children_before: frozenset[int] = field(default_factory=frozenset)


class Criu:
    """CRIU driven through pycriu's RPC (`criu swrk`, one CRIU process per request): dump a
    process tree into a directory, restore one from it. Blocking: call it from a worker
    thread. A failure is a CriuError quoting CRIU's own error lines and naming its log."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        # The `criu swrk` children at work and our end of their RPC socket, for kill_running
        # (sessions run in threads).
        self._running: dict[subprocess.Popen[bytes], socket.socket] = {}
        self._running_lock = threading.Lock()

    def kill_running(self) -> int:
        """SIGKILL every CRIU at work (a deadline passed): each dump fails and its program
        runs on, as after any CRIU killed mid-dump. Returns how many were killed.

        Each session's socket is shut down too: a child CRIU forked (a feature probe, which
        stops itself) holds a copy of CRIU's end, so CRIU's death alone would leave the
        thread waiting for an answer that never comes."""
        with self._running_lock:
            sessions = list(self._running.items())
        killed = 0
        for process, sock in sessions:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                killed += 1
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return killed

    def dump(self, request: DumpRequest) -> None:
        import pycriu

        log_path = request.images_dir / request.log_name
        failure: Exception | None = None
        with (
            self._session(request.hold_fds, "dump", log_path) as session,
            _open_dir(request.images_dir) as dir_fd,
        ):
            opts = session.client.opts
            opts.images_dir_fd = dir_fd
            opts.pid = request.pid
            opts.leave_running = request.leave_running
            opts.leave_stopped = request.leave_stopped
            apply_options(opts, request.options.for_dump())
            for mount_point, name in request.external_mounts.items():
                opts.external.append(f"mnt[{mount_point}]:{name}")
            opts.external.append("mnt[]")
            opts.log_file = request.log_name
            opts.log_level = LOG_LEVEL
            try:
                if request.on_post_dump is None:
                    session.client.dump()
                else:
                    dump_with_notifications(session.sock, opts, request.on_post_dump)
            except (pycriu.CRIUException, ConnectionError) as exc:
                failure = exc
            except PostDumpFailed as exc:
                raise CriuError("dump", f"{exc} (CRIU resumed the program)", None) from exc
        if failure is not None:
            _end_orphaned_helpers()
            error = self._failure("dump", failure, log_path, session.process)
            undumpable = undumpable_fds(request.pid)
            if undumpable:
                # CRIU's log does not say which file stopped it: the cause comes first.
                error = CriuError("dump", "; ".join([*undumpable, error.detail]), log_path)
            raise error from failure

    def restore(self, request: RestoreRequest) -> int:
        """Restore the tree as a child of this process; returns the root's host pid."""
        import pycriu

        log_path = request.work_dir / request.log_name
        fds = tuple(request.inherit_fds.values())
        failure: pycriu.CRIUException | None = None
        with (
            self._session(fds, "restore", log_path) as session,
            _open_dir(request.images_dir) as dir_fd,
            _open_dir(request.work_dir) as work_fd,
        ):
            opts = session.client.opts
            opts.images_dir_fd = dir_fd
            opts.work_dir_fd = work_fd
            opts.root = "/"
            opts.rst_sibling = True
            opts.lazy_pages = request.lazy_pages
            apply_options(opts, request.options.for_restore(request.images_dir))
            for name, host_path in request.external_mounts.items():
                opts.external.append(f"mnt[{name}]:{host_path}")
            opts.external.append("mnt[]")
            opts.log_file = request.log_name
            opts.log_level = LOG_LEVEL
            if request.cgroup_root is not None:
                root = opts.cg_root.add()
                root.ctrl = ""  # CRIU's name for the cgroup v2 hierarchy (v1 ones are kept)
                root.path = request.cgroup_root
            for key, fd in request.inherit_fds.items():
                entry = opts.inherit_fd.add()
                entry.key = key
                entry.fd = fd
            if request.on_criu_started is not None:
                request.on_criu_started(session.process.pid)
            try:
                response = session.client.restore()
            except pycriu.CRIUException as exc:
                failure = exc
        if failure is not None:
            _end_restore_leftovers(session)
            _end_orphaned_helpers()
            raise self._failure("restore", failure, log_path, session.process) from failure
        return int(response.pid)

    def lazy_pages_command(
        self, images_dir: Path, work_dir: Path, status_fd: int, log_name: str
    ) -> list[str]:
        """`criu lazy-pages`: serves the memory of a restore started with `lazy_pages` through
        userfaultfd, over a socket in `work_dir`; writes a byte to `status_fd` once listening
        and exits (status 0) when every page has been served."""
        return [
            os.fspath(self.binary),
            "lazy-pages",
            "--images-dir",
            os.fspath(images_dir),
            "--work-dir",
            os.fspath(work_dir),
            "--status-fd",
            str(status_fd),
            "--log-file",
            log_name,
            f"-v{LOG_LEVEL}",
        ]

    @contextlib.contextmanager
    def _session(
        self, pass_fds: tuple[int, ...], action: str, log_path: Path
    ) -> Iterator[_Session]:
        """A `criu swrk` child speaking to a pycriu client over a socketpair.

        The child is started with subprocess (no fork of this threaded process), and
        receives the fds a restore must inherit. On leaving, the child has exited.
        """
        children_before = _thread_children()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            swrk = subprocess.Popen(
                [os.fspath(self.binary), "swrk", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *pass_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise CriuError(action, f"cannot run {self.binary}: {exc.strerror}", None) from exc
        finally:
            theirs.close()
        import pycriu

        client = pycriu.criu()
        with self._running_lock:
            self._running[swrk] = ours
        with _ACTIVE_LOCK:
            _ACTIVE_SWRK.add(swrk.pid)
        try:
            client.use_fd(ours.fileno())
            yield _Session(client, swrk, ours, children_before)
        finally:
            with self._running_lock:
                self._running.pop(swrk, None)
            # pycriu talks through its own dup of `ours`, and leaves it open when CRIU
            # fails to answer (killed mid-request, say).
            comm_socket = getattr(client._comm, "sk", None)
            if comm_socket is not None:
                comm_socket.close()
            ours.close()
            try:
                swrk.wait(timeout=SWRK_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                swrk.kill()
                swrk.wait()
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE_SWRK.discard(swrk.pid)

    @staticmethod
    def _failure(
        action: str, exc: Exception, log_path: Path, swrk: subprocess.Popen[bytes]
    ) -> CriuError:
        lines = error_lines(log_path)
        if swrk.returncode is not None and swrk.returncode < 0:
            name = signal.Signals(-swrk.returncode).name
            lines.insert(0, f"criu (pid {swrk.pid}) was killed by {name} before it finished")
        detail = "; ".join(lines) if lines else str(exc)
        return CriuError(action, detail, log_path)


def _thread_children() -> frozenset[int]:
    """Children of the calling thread (those it forked), as the kernel lists them."""
    path = f"/proc/self/task/{threading.get_native_id()}/children"
    try:
        with open(path) as listing:
            return frozenset(int(pid) for pid in listing.read().split())
    except OSError:
        return frozenset()


# The `criu swrk` processes of the sessions under way (any thread).
_ACTIVE_SWRK: set[int] = set()
_ACTIVE_LOCK = threading.Lock()


def _namespace_depth(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return len(line.split()) - 1
    except OSError:
        pass
    return 0


def _end_orphaned_helpers() -> None:
    """CRIU's helper processes (its cgroupd, the child of a feature probe) outlive a dump or
    a restore that failed and are re-parented to this process, a child subreaper: end and
    reap those in this process's PID namespace (a restored task is in its own), other than
    a session's `criu swrk` and a lazy-pages daemon (which leads a session of its own)."""
    own_depth = _namespace_depth("self")
    for pid in own_children():
        with _ACTIVE_LOCK:
            if pid in _ACTIVE_SWRK:
                continue
        try:
            with open(f"/proc/{pid}/comm") as comm:
                if comm.read().strip() != "criu":
                    continue
            if int(stat_fields(pid)[STAT_SESSION]) == pid:
                continue
        except (OSError, ValueError, IndexError):
            continue
        if _namespace_depth(pid) == own_depth:
            kill_and_reap(pid)


def _end_restore_leftovers(session: _Session) -> None:
    """A failed restore may leave the partly restored root behind as our child (restored as
    CRIU's sibling): a zombie CRIU already killed, or a task it gave up on. End and reap it,
    so that no unsupervised copy runs and no zombie accumulates."""
    for pid in _thread_children() - session.children_before - {session.process.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    """The directory CRIU works in, as an fd it is handed: never through a symlink there (the
    directories above are checked by the caller, see store/trust.py)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TaskCondition:
    """What a dump that went wrong can leave in a task (CRIU seizes it with ptrace and runs
    its parasite code inside it)."""

    stopped: bool
    """In a group stop or a ptrace stop."""
    tracer_pid: int
    parasite_mappings: int
    """Mappings of CRIU's parasite blob, left when CRIU dies before removing it."""


PARASITE_MAPPING = "/memfd:CRIUMFD"
PF_EXITING = 0x4
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _sigkill_pending(status_line: str) -> bool:
    """True for a SigPnd or ShdPnd line of /proc/PID/status that holds SIGKILL."""
    name, _, mask = status_line.partition(":")
    return name in ("SigPnd", "ShdPnd") and bool(int(mask, 16) & SIGKILL_BIT)


def task_condition(pid: int) -> TaskCondition | None:
    """The condition of task `pid`, or None when it is gone, a zombie, or on its way out
    (exiting, or SIGKILL pending: a sandbox's init killed a moment ago still runs while its
    namespace empties)."""
    try:
        fields = stat_fields(pid)
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state = fields[STAT_STATE]
    if state in ("Z", "X") or int(fields[STAT_FLAGS]) & PF_EXITING:
        return None
    if any(_sigkill_pending(line) for line in status):
        return None
    tracer = next(
        (int(line.split()[1]) for line in status if line.startswith("TracerPid:")),
        0,
    )
    return TaskCondition(
        stopped=state in ("T", "t"),
        tracer_pid=tracer,
        parasite_mappings=sum(1 for line in maps.splitlines() if PARASITE_MAPPING in line),
    )


def tree_condition(root_pid: int) -> dict[int, TaskCondition]:
    """The condition of every live task of the tree rooted at `root_pid` (CRIU dumps them all:
    with an init, the program is the root's child)."""
    conditions: dict[int, TaskCondition] = {}
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        condition = task_condition(pid)
        if condition is None or pid in conditions:
            continue
        conditions[pid] = condition
        pending.extend(children(pid))
    return conditions


def pipe_key(inode: int) -> str:
    return f"pipe:[{inode}]"
