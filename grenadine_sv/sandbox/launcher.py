"""Start one program as PID 1 of new PID and mount namespaces, in a root that CRIU can dump.

The program runs as the child of an init (the spec's ``init``, Debian's tini) that is PID 1, or
as PID 1 itself when the spec has no init.

Run as ``python -I -S launcher.py STATUS_FD`` with the sandbox spec (JSON) on stdin and the
program's stdout/stderr already in place; or once per supervisor as
``python -I -S launcher.py --serve CONTROL_FD``, forking a launch per request (see `serve`).
Standard library only: it runs without site-packages.

Reports on STATUS_FD, one JSON object per line: ``{"pid": N}`` (PID 1's host pid) as soon
as it is forked, and ``{"error": "..."}`` if any step fails. STATUS_FD is close-on-exec, so the
reader sees EOF once this launcher has exited and the program has exec'ed or died.
"""

from __future__ import annotations

import ctypes
import grp
import json
import os
import pwd
import re
import select
import signal
import socket
import sys

# Not `from typing import ...`: importing typing costs this long-lived process ~2 MiB.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_MOUNTS = ("/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/tmp", "/sys")
CGROUP_ROOT = "/sys/fs/cgroup"
EXIT_STEP_FAILED = 127
SERVE_FLAG = "--serve"
MAX_REQUEST_BYTES = 1 << 20
# Launches forked and not yet ended, at most (each is a few ms of one core's work).
MAX_LAUNCHES_AT_ONCE = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


class StepFailed(Exception):
    """A step of the launch failed; the message is the sentence the supervisor shows."""


def _failure(what: str) -> StepFailed:
    code = ctypes.get_errno()
    return StepFailed(f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    encoded = [None if value is None else os.fsencode(value) for value in (source, target, fstype)]
    if _libc.mount(encoded[0], encoded[1], encoded[2], flags, None) != 0:
        raise _failure(what)


def _bind(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND, f"cannot bind-mount {source} onto {target}")


def _pivot_root_here() -> None:
    """Make "." the root and detach the old one (runc's trick: no put_old directory needed)."""
    machine = os.uname().machine
    number = PIVOT_ROOT_SYSCALL.get(machine)
    if number is None:
        raise StepFailed(f"pivot_root: unsupported architecture {machine}")
    if _libc.syscall(ctypes.c_long(number), ctypes.c_char_p(b"."), ctypes.c_char_p(b".")) != 0:
        raise _failure("cannot pivot_root into the sandbox root")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        raise _failure("cannot detach the old root after pivot_root")


def _host_cgroup_mounts() -> list[str]:
    """The cgroup mount points under /sys/fs/cgroup, parents before children (mount order)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            escaped = line.split()[4]
            point = os.fsdecode(re.sub(rb"\\([0-7]{3})", _octal_byte, escaped))
            if point == CGROUP_ROOT or point.startswith(CGROUP_ROOT + "/"):
                points.append(point)
    return list(dict.fromkeys(points))


def _octal_byte(match: re.Match[bytes]) -> bytes:
    return bytes([int(match.group(1), 8)])


def _make_mount_point(source: str, target: str) -> None:
    """Create ``target`` (in a private /tmp) as a directory or file like ``source``."""
    if os.path.lexists(target):
        return
    try:
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as error:
        raise StepFailed(f"cannot create {target} to bind {source}: {error.strerror}") from error


def build_root(root: str, binds: list[str], tmp: str | None = None) -> None:
    """In this (new) mount namespace, bind the host's mounts under ``root``, then pivot into it.

    With ``tmp``, that host directory is the program's /tmp; binds below /tmp go on top of it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, "cannot make the mounts private (make-rprivate /)")
    _bind("/", root)
    _mount(
        "proc",
        root + "/proc",
        "proc",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"cannot mount a new proc on {root}/proc",
    )
    for path in HOST_MOUNTS:
        if path == "/tmp" and tmp is not None:
            _bind(tmp, root + path)
        elif path != "/dev/mqueue" or os.path.isdir(path):
            _bind(path, root + path)
    for path in _host_cgroup_mounts():
        _bind(path, root + path)
    for path in binds:
        if tmp is not None and path.startswith("/tmp/"):
            _make_mount_point(path, root + path)
        _bind(path, root + path)
    try:
        os.chdir(root)
    except OSError as error:
        raise StepFailed(f"cannot enter the sandbox root {root}: {error.strerror}") from error
    _pivot_root_here()
    os.chdir("/")


class Identity:
    """Who the program runs as, resolved before fds are closed (NSS may open files)."""

    def __init__(self, user: str | None, group: str | None) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        self.groups: list[int] | None = None
        if user is not None:
            account = _lookup_user(user)
            self.uid = account.pw_uid
            self.gid = account.pw_gid if group is None else _lookup_group(group)
            self.groups = os.getgrouplist(account.pw_name, self.gid)
        elif group is not None:
            self.gid = _lookup_group(group)
            self.groups = [self.gid]

    def assume(self) -> None:
        if self.gid is not None:
            try:
                os.setgid(self.gid)
            except OSError as error:
                raise StepFailed(
                    f"cannot switch to group id {self.gid}: {error.strerror}"
                ) from error
        if self.groups is not None:
            try:
                os.setgroups(self.groups)
            except OSError as error:
                raise StepFailed(f"cannot set supplementary groups: {error.strerror}") from error
        if self.uid is not None:
            try:
                os.setuid(self.uid)
            except OSError as error:
                raise StepFailed(
                    f"cannot switch to user id {self.uid}: {error.strerror}"
                ) from error


def _lookup_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():
            try:
                return pwd.getpwuid(int(name))
            except KeyError:
                pass
    raise StepFailed(f"unknown user {name!r}: no such user in the passwd database")


def _lookup_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
    raise StepFailed(f"unknown group {name!r}: no such group in the group database")


def _keep_only_stdio(status_fd: int) -> None:
    """Close every fd above 2 but the (close-on-exec) status fd; stdin becomes /dev/null."""
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, os.sysconf("SC_OPEN_MAX"))
    try:
        null = os.open("/dev/null", os.O_RDONLY)
    except OSError as error:
        raise StepFailed(f"cannot open /dev/null inside the sandbox: {error.strerror}") from error
    os.dup2(null, 0)
    os.close(null)


def _resolve(name: str, search_path: str) -> str:
    """The executable that exec would run for ``name``, searched in PATH as execvp does."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(folder or ".", name) for folder in search_path.split(":")]
    denied: str | None = None
    for candidate in candidates:
        if not os.path.isfile(candidate):
            continue
        if os.access(candidate, os.X_OK):
            return candidate
        denied = denied or candidate
    if denied is not None:
        raise StepFailed(f"cannot execute {denied}: permission denied")
    if "/" in name:
        raise StepFailed(f"command not found: {name} does not exist")
    raise StepFailed(f"command not found: {name!r} is in no directory of PATH={search_path}")


def _exec(command: list[str], environment: dict[str, str], init: str | None) -> NoReturn:
    """Exec the program, or the init with the program as its only child."""
    program = _resolve(command[0], environment.get("PATH", DEFAULT_PATH))
    if init is None:
        path, argv = program, [command[0], *command[1:]]
    else:
        if not os.access(init, os.X_OK):
            raise StepFailed(
                f"the sandbox init {init} is missing or not executable: install Debian's tini"
                " package (apt-get install tini), or set init = false for this program"
            )
        path, argv = init, [init, "--", program, *command[1:]]
    try:
        os.execve(path, argv, environment)
    except OSError as error:
        raise StepFailed(f"cannot execute {path}: {error.strerror}") from error


def run_program(spec: dict[str, Any], status_fd: int) -> NoReturn:
    """In the forked child (PID 1 of the new PID namespace): build the sandbox and exec."""
    build_root(spec["root_anchor"].rstrip("/"), list(spec["binds"]), spec.get("tmp"))
    os.setsid()
    identity = Identity(spec["user"], spec["group"])
    _keep_only_stdio(status_fd)
    if spec["umask"] is not None:
        os.umask(spec["umask"])
    identity.assume()
    directory = spec["directory"]
    try:
        os.chdir(directory)
    except OSError as error:
        raise StepFailed(f"cannot change directory to {directory}: {error.strerror}") from error
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _exec(list(spec["command"]), dict(spec["environment"]), spec.get("init"))


def report(status_fd: int, **fields: object) -> None:
    os.write(status_fd, (json.dumps(fields) + "\n").encode())


def read_spec() -> bytes:
    chunks = []
    while chunk := os.read(0, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_spec(data: bytes) -> dict[str, Any]:
    try:
        spec = json.loads(data)
    except ValueError as error:
        raise StepFailed(f"the sandbox launcher received an invalid spec: {error}") from error
    if not isinstance(spec, dict):
        raise StepFailed("the sandbox launcher received a spec that is not a JSON object")
    return spec


def join_cgroup(cgroup: str | None) -> None:
    """Move this launcher into the program's cgroup: the program it forks is born there."""
    if cgroup is None:
        return
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write("0\n")
    except OSError as error:
        raise StepFailed(f"cannot join the program's cgroup {cgroup}: {error.strerror}") from error


def main(argv: list[str]) -> int:
    if argv[1] == SERVE_FLAG:
        return serve(int(argv[2]))
    status_fd = int(argv[1])
    return launch(read_spec(), status_fd)


def serve(control_fd: int) -> int:
    """Launch a sandbox per request, by forking this interpreter: no Python start-up per program.

    A request on the (SOCK_SEQPACKET) control socket is `ID SPEC` (a number, a space, the spec
    as JSON) with three fds: the program's stdout and stderr and the status fd. A forked child
    launches as `launch` does and exits once it has forked the sandbox's PID 1; this server
    reaps it, so PID 1 is re-parented to the supervisor (the nearest child subreaper), and
    answers `{"id": ID, "exit": CODE}`. Up to MAX_LAUNCHES_AT_ONCE children work at the same
    time, each answered when it ends. The server ends when the supervisor closes its end of
    the socket, once its children have ended."""
    control = socket.socket(fileno=control_fd)
    os.set_inheritable(control_fd, False)
    poller = select.poll()
    children: dict[int, tuple[int, bytes]] = {}  # pidfd -> (pid, request id)
    listening = True
    poller.register(control_fd, select.POLLIN)
    try:
        while listening or children:
            for fd, _events in poller.poll():
                if fd in children:
                    pid, request_id = children.pop(fd)
                    poller.unregister(fd)
                    os.close(fd)
                    _, wait_status = os.waitpid(pid, 0)
                    code = os.waitstatus_to_exitcode(wait_status)
                    try:
                        control.send(_answer(request_id, code))
                    except OSError:
                        if listening:
                            poller.unregister(control_fd)
                        listening = False
                elif listening:
                    listening = _take_request(control, children, poller)
                    if not listening:
                        poller.unregister(control_fd)  # a hung-up socket polls ready forever
            if listening:
                full = len(children) >= MAX_LAUNCHES_AT_ONCE
                poller.modify(control_fd, 0 if full else select.POLLIN)
    finally:
        for pidfd, (pid, _request_id) in children.items():
            os.close(pidfd)
            os.waitpid(pid, 0)
    return 0


def _answer(request_id: bytes, code: int) -> bytes:
    return b'{"id": %s, "exit": %d}' % (request_id, code)


def _take_request(
    control: socket.socket, children: dict[int, tuple[int, bytes]], poller: select.poll
) -> bool:
    """Read one request and fork its launch; False once the supervisor has gone."""
    try:
        data, fds, _flags, _address = socket.recv_fds(control, MAX_REQUEST_BYTES, 3)
    except OSError:
        return False
    if not data:
        return False
    request_id, _, spec = data.partition(b" ")
    if not request_id.isdigit():
        request_id = b"0"
    try:
        child = _fork_launch(control, spec, *fds) if len(fds) == 3 else None
        if child is None:
            control.send(_answer(request_id, EXIT_STEP_FAILED))
        else:
            pidfd = os.pidfd_open(child)
            children[pidfd] = (child, request_id)
            poller.register(pidfd, select.POLLIN)
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _fork_launch(
    control: socket.socket, data: bytes, stdout: int, stderr: int, status: int
) -> int | None:
    """The pid of a child that launches `data`; None (reported on `status`) if none."""
    try:
        child = os.fork()
    except OSError as error:
        report(status, error=f"the sandbox launcher cannot fork: {error.strerror}")
        return None
    if child == 0:
        code = EXIT_STEP_FAILED
        try:
            control.close()
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            code = launch(data, status)
        finally:
            os._exit(code)
    return child


def launch(data: bytes, status_fd: int) -> int:
    """Create the namespaces, fork the sandbox's PID 1 (which builds the root and execs) and
    report its pid on `status_fd`."""
    os.set_inheritable(status_fd, False)
    try:
        spec = parse_spec(data)
        join_cgroup(spec.get("cgroup"))
        if _libc.unshare(CLONE_NEWPID | CLONE_NEWNS) != 0:
            raise _failure("cannot create the PID and mount namespaces (unshare)")
        pid = os.fork()
    except StepFailed as error:
        report(status_fd, error=str(error))
        return 1
    except OSError as error:
        report(status_fd, error=f"the sandbox launcher failed: {error}")
        return 1
    if pid == 0:
        try:
            run_program(spec, status_fd)
        except StepFailed as error:
            report(status_fd, error=str(error))
        except Exception as error:  # anything unforeseen must still reach the supervisor
            report(status_fd, error=f"the sandbox launcher failed unexpectedly: {error!r}")
        finally:
            os._exit(EXIT_STEP_FAILED)  # never return into the parent's code path
    report(status_fd, pid=pid)
    return 0


if __name__ == "__main__":
    os._exit(main(sys.argv))
