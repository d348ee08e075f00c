"""The sandbox with real processes: namespaces, mounts, fds, users, signals, a CRIU round trip."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from grenadine_sv import helpers
from grenadine_sv.sandbox import (
    LauncherServer,
    SandboxError,
    SandboxProcess,
    SandboxSpec,
    become_subreaper,
    spawn_sandbox,
)
from grenadine_sv.sandbox import process as sandbox_process
from grenadine_sv.sandbox.linux import is_subreaper, read_start_time, set_child_subreaper
from tests.conftest import free_port
from tests.integration.supervising import children_of, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root"),
]

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRIU_BINARIES = ("/tmp/aptsrc/src/criu-4.2.1/criu/criu", "/usr/local/sbin/criu")
BOUND = 10.0


@pytest.fixture(scope="module", autouse=True)
def _subreaper() -> Iterator[None]:
    was_subreaper = is_subreaper()
    become_subreaper()
    yield
    if not was_subreaper:
        set_child_subreaper(False)


def our_children() -> set[int]:
    return set(children_of(os.getpid()))


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    before = our_children()
    yield
    assert our_children() <= before, "a test left a child process behind"


@pytest.fixture(autouse=True, params=["own-launcher", "launcher-server"])
def launcher_server(request: pytest.FixtureRequest) -> Iterator[LauncherServer | None]:
    """Each test runs with a launcher process per program, and through the forking server the
    supervisor uses (ended, by pid, before the leftover check)."""
    server = LauncherServer() if request.param == "launcher-server" else None
    _launch["server"] = server
    yield server
    _launch["server"] = None
    if server is not None:
        server.close()


_launch: dict[str, LauncherServer | None] = {"server": None}


@pytest.fixture
def anchor() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="grenadine-anchor-")
    yield path
    os.rmdir(path)


class Pipe:
    """A pipe whose write end goes to a sandboxed program and whose read end the test reads."""

    def __init__(self) -> None:
        read_fd, self.write_fd = os.pipe()
        self.stream = trio.lowlevel.FdStream(read_fd)
        self.received = b""

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        with trio.fail_after(BOUND):
            while not done(self.received):
                chunk = await self.stream.receive_some()
                if not chunk:
                    break
                self.received += chunk
        return self.received

    async def read_to_eof(self) -> str:
        """Everything written until every write end is closed (ours must be closed first)."""
        return (await self.read_until(lambda _: False)).decode()


@pytest.fixture
async def pipe() -> AsyncIterator[Pipe]:
    opened = Pipe()
    yield opened
    opened.close_write_end()
    await opened.stream.aclose()


@pytest.fixture
async def stderr_pipe() -> AsyncIterator[Pipe]:
    opened = Pipe()
    yield opened
    opened.close_write_end()
    await opened.stream.aclose()


def make_spec(anchor: str, *command: str, **fields: Any) -> SandboxSpec:
    environment: Mapping[str, str] = fields.pop("environment", {"PATH": PATH})
    return SandboxSpec(
        name="test", command=command, environment=environment, root_anchor=anchor, **fields
    )


@asynccontextmanager
async def sandboxed(
    spec: SandboxSpec, out: Pipe, err: Pipe | None = None
) -> AsyncIterator[SandboxProcess]:
    """Start a program, close our copy of its pipe's write end, and end it by pid afterwards."""
    process = await spawn_sandbox(spec, out.write_fd, (err or out).write_fd, _launch["server"])
    out.close_write_end()
    if err is not None:
        err.close_write_end()
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGKILL)
            await process.wait()
            process.close()


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise AssertionError(f"/proc/{pid}/status has no {name} line")


def mount_points(mountinfo: str) -> list[str]:
    return [line.split()[4] for line in Path(mountinfo).read_text().splitlines()]


def host_mounts() -> list[str]:
    return mount_points("/proc/self/mountinfo")


def ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


async def test_program_is_pid_1_of_its_own_namespaces(anchor: str, pipe: Pipe) -> None:
    async with sandboxed(make_spec(anchor, "sleep", "1000"), pipe) as process:
        pid = process.pid
        assert status_field(pid, "NSpid").endswith("\t1")
        assert int(status_field(pid, "PPid")) == os.getpid()
        assert ns_inode(pid, "pid") == process.pid_ns_inode != ns_inode("self", "pid")
        assert ns_inode(pid, "mnt") != ns_inode("self", "mnt")
        assert process.start_time == read_start_time(pid)
        session_id = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert session_id == pid, "the program must lead its own session (setsid)"


async def test_only_stdio_is_open_and_stdin_is_dev_null_inside(anchor: str, pipe: Pipe) -> None:
    async with sandboxed(make_spec(anchor, "sleep", "1000"), pipe) as process:
        pid = process.pid
        # The close-on-exec status fd goes at the exec, which may come a moment after the
        # launch has reported the pid, and the dynamic loader's own fds come and go after it:
        # wait until sleep sleeps, then look.
        await wait_for(lambda: "nanosleep" in Path(f"/proc/{pid}/wchan").read_text(), BOUND)
        assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == f"pipe:[{os.fstat(pipe.stream.fileno()).st_ino}]"
        fdinfo = Path(f"/proc/{pid}/fdinfo/0").read_text()
        stdin_mount = next(
            line.split()[1] for line in fdinfo.splitlines() if line.startswith("mnt_id")
        )
        own_mounts = {
            line.split()[0] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        }
        assert stdin_mount in own_mounts, (
            "stdin must be opened after pivot_root, inside the sandbox"
        )


async def test_output_reaches_the_supervisors_pipes(
    anchor: str, pipe: Pipe, stderr_pipe: Pipe
) -> None:
    spec = make_spec(anchor, "sh", "-c", "echo to-stdout; echo to-stderr >&2")
    async with sandboxed(spec, pipe, stderr_pipe) as process:
        assert await pipe.read_to_eof() == "to-stdout\n"
        assert await stderr_pipe.read_to_eof() == "to-stderr\n"
        assert await process.wait() == 0


async def test_proc_inside_shows_only_the_sandboxs_processes(anchor: str, pipe: Pipe) -> None:
    async with sandboxed(make_spec(anchor, "sh", "-c", "exec ls /proc"), pipe) as process:
        listing = (await pipe.read_to_eof()).split()
        assert await process.wait() == 0
    assert [entry for entry in listing if entry.isdigit()] == ["1"]


def mounts_below(anchor: str) -> list[str]:
    """Host mounts at or below the sandbox root's anchor, where the launcher builds the root.

    (Not the whole host table: other tests on this host may mount things meanwhile.)"""
    return [point for point in host_mounts() if point == anchor or point.startswith(anchor + "/")]


async def test_mounts_stay_inside_the_sandbox(anchor: str, pipe: Pipe) -> None:
    async with sandboxed(make_spec(anchor, "sleep", "1000"), pipe) as process:
        assert mounts_below(anchor) == []
        inside = mount_points(f"/proc/{process.pid}/mountinfo")
    assert mounts_below(anchor) == []
    assert inside[:2] == ["/", "/proc"]
    assert {"/dev", "/dev/pts", "/dev/shm", "/tmp", "/sys"} <= set(inside)
    assert not any(point.startswith(anchor) for point in inside), "the old root must be detached"


async def test_environment_directory_and_umask_are_applied(
    anchor: str, pipe: Pipe, tmp_path: Path
) -> None:
    spec = make_spec(
        anchor,
        "sh",
        "-c",
        'echo "$GREETING"; pwd; umask; echo "${HOME-unset}"',
        environment={"GREETING": "hello there", "PATH": PATH},
        directory=str(tmp_path),
        umask=0o027,
    )
    async with sandboxed(spec, pipe) as process:
        output = await pipe.read_to_eof()
        assert await process.wait() == 0
    assert output.splitlines() == ["hello there", str(tmp_path), "0027", "unset"]


async def test_command_is_found_through_the_default_path(anchor: str, pipe: Pipe) -> None:
    spec = make_spec(anchor, "env", environment={})
    async with sandboxed(spec, pipe) as process:
        assert await pipe.read_to_eof() == "", "the program's environment is exactly the spec's"
        assert await process.wait() == 0


async def test_user_sets_uid_gid_and_supplementary_groups(anchor: str, pipe: Pipe) -> None:
    spec = make_spec(anchor, "sh", "-c", "id -u; id -g; id -G", user="nobody")
    async with sandboxed(spec, pipe) as process:
        output = await pipe.read_to_eof()
        assert await process.wait() == 0
    uid, gid, groups = output.splitlines()
    assert (uid, gid, groups.split()) == ("65534", "65534", ["65534"])


async def test_group_alone_keeps_the_user(anchor: str, pipe: Pipe) -> None:
    spec = make_spec(anchor, "sh", "-c", "id -u; id -g; id -G", group="nogroup")
    async with sandboxed(spec, pipe) as process:
        output = await pipe.read_to_eof()
        assert await process.wait() == 0
    assert output.splitlines() == ["0", "65534", "65534"]


@pytest.mark.parametrize(
    ("fields", "command", "message"),
    [
        ({}, "no-such-command-xyz", "command not found: 'no-such-command-xyz'"),
        ({}, "/no/such/program", "command not found: /no/such/program"),
        ({}, "/etc/passwd", "cannot execute /etc/passwd: permission denied"),
        ({"user": "no-such-user-xyz"}, "true", "unknown user 'no-such-user-xyz'"),
        ({"group": "no-such-group-xyz"}, "true", "unknown group 'no-such-group-xyz'"),
        ({"directory": "/no/such/dir"}, "true", "cannot change directory to /no/such/dir"),
        ({"binds": ("/no/such/bind",)}, "true", "cannot bind-mount /no/such/bind onto "),
    ],
)
async def test_a_failing_step_raises_a_sandbox_error_naming_it(
    anchor: str, pipe: Pipe, fields: dict[str, Any], command: str, message: str
) -> None:
    spec = make_spec(anchor, command, **fields)
    with pytest.raises(SandboxError, match="^" + message.replace("(", r"\(")) as raised:
        await spawn_sandbox(spec, pipe.write_fd, pipe.write_fd, _launch["server"])
    pipe.close_write_end()
    assert await pipe.read_to_eof() == "", f"nothing should reach the program's output: {raised}"


# Strings the wire spec must carry byte for byte: separators of other formats, non-ASCII.
TRICKY = ("with space", "a=b", "=", "", "né\nline", "tab\there", "'quote\"", "emoji 😀")


async def test_tricky_strings_reach_the_program_intact(
    anchor: str, pipe: Pipe, tmp_path: Path
) -> None:
    directory = tmp_path / "dir with space=é\nx"
    directory.mkdir()
    bound = tmp_path / "bind =é"
    bound.mkdir()
    environment = {"PATH": PATH, **{f"VAR{i}": value for i, value in enumerate(TRICKY)}}
    script = "pwd; sleep 1000; :"  # not exec'ed: sh's argv stays in its cmdline
    spec = make_spec(
        anchor,
        "sh",
        "-c",
        script,
        *TRICKY,
        environment=environment,
        directory=str(directory),
        binds=(str(bound),),
    )
    async with sandboxed(spec, pipe) as process:
        assert await pipe.read_until(lambda got: got.endswith(b"\n")) == os.fsencode(
            f"{directory}\n"
        )
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        inside = mount_points(f"/proc/{process.pid}/mountinfo")
    assert cmdline.split(b"\0")[:-1] == [os.fsencode(arg) for arg in spec.command]
    assert sorted(environ.split(b"\0")[:-1]) == sorted(
        os.fsencode(f"{key}={value}") for key, value in environment.items()
    )
    assert str(bound).replace(" ", "\\040") in inside


async def launch_raw(server: LauncherServer | None, request: bytes, out: Pipe) -> list[str]:
    """Hand `request` to the launcher as its spec, as is; the lines it reports."""
    status = Pipe()
    try:
        if server is None:
            launcher = subprocess.run(
                [*sandbox_process._launcher_command(), str(status.write_fd)],
                input=request,
                stdout=out.write_fd,
                stderr=out.write_fd,
                pass_fds=(status.write_fd,),
                timeout=BOUND,
                check=False,
            )
            assert launcher.returncode == 1
        else:
            with trio.fail_after(BOUND):
                await server.launch(request, (out.write_fd, out.write_fd, status.write_fd))
        status.close_write_end()
        return (await status.read_to_eof()).splitlines()
    finally:
        status.close_write_end()
        await status.stream.aclose()


INVALID = "the sandbox launcher received an invalid spec: "


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"", "it has no arg"),
        (b"arg=true", "it does not end with a NUL byte"),
        (b"no equals sign\0", "an entry has no '=': no equals sign"),
        (b"arg=true\0color=blue\0", "unknown field color"),
        (b"arg=true\0directory=/\0directory=/tmp\0", "directory is given twice"),
        (b"arg=true\0directory=/\0", "it has no root_anchor"),
        (b"\xff\n=\0", "unknown field \udcff\n"),
    ],
)
async def test_a_malformed_wire_spec_is_reported_not_launched(
    launcher_server: LauncherServer | None, pipe: Pipe, request_bytes: bytes, message: str
) -> None:
    reports = await launch_raw(launcher_server, request_bytes, pipe)
    assert [json.loads(line) for line in reports] == [{"error": INVALID + message}]
    pipe.close_write_end()
    assert await pipe.read_to_eof() == ""


async def test_an_invalid_umask_is_reported_and_the_server_goes_on(
    anchor: str, launcher_server: LauncherServer | None, pipe: Pipe
) -> None:
    wire = make_spec(anchor, "true").to_wire() + b"umask=8\0"
    reports = await launch_raw(launcher_server, wire, pipe)
    assert [json.loads(line) for line in reports] == [
        {"error": INVALID + "umask 8 is not an octal number up to 777"}
    ]
    server_pid = launcher_server.pid if launcher_server is not None else None
    async with sandboxed(make_spec(anchor, "sh", "-c", "echo fine"), pipe) as process:
        assert await pipe.read_to_eof() == "fine\n"
        assert await process.wait() == 0
    if launcher_server is not None:
        assert launcher_server.pid == server_pid, "the same server launched it"


def answers(control: socket.socket) -> Iterator[dict[str, int]]:
    while True:
        ready, _, _ = select.select([control], [], [], BOUND)
        assert ready, f"no answer within {BOUND} s"
        yield json.loads(control.recv(4096))


def is_closed_everywhere(read_fd: int) -> bool:
    """True once every write end of the pipe is closed (its read end then polls EOF)."""
    ready, _, _ = select.select([read_fd], [], [], BOUND)
    return bool(ready) and os.read(read_fd, 1) == b""


def test_a_request_without_exactly_three_fds_is_answered_127(
    launcher_server: LauncherServer | None,
) -> None:
    """Talks to a server of its own on a socketpair: requests with 0, 2 and 4 fds (the fds are
    the write end of a pipe) get exit 127, and the server keeps none of those fds."""
    if launcher_server is None:
        pytest.skip("about the launcher server only")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(
        [*sandbox_process._launcher_command(), "--serve", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    try:
        theirs.close()
        got = answers(ours)
        for request_id, count in ((7, 0), (8, 2), (9, 4)):
            socket.send_fds(ours, [b"%d arg=true\0" % request_id], [write_fd] * count)
            assert next(got) == {"id": request_id, "exit": 127}
        socket.send_fds(ours, [b"x1 arg=true\0"], [write_fd])
        assert next(got) == {"id": 0, "exit": 127}, "an id that is not digits is answered as 0"
        os.close(write_fd)
        write_fd = -1
        assert is_closed_everywhere(read_fd), "the server kept an fd of a refused request"
        ours.close()
        assert server.wait(timeout=BOUND) == 0, "the server ends when its socket hangs up"
    finally:
        ours.close()
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if server.poll() is None:
            server.kill()
        server.wait()


@pytest.fixture
def separate_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted on the host, like a separate /srv partition (unmounted afterwards)."""
    point = tmp_path / "srv"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


async def test_a_directory_on_a_mount_the_sandbox_lacks_is_named_with_its_fix(
    anchor: str, pipe: Pipe, separate_mount: Path
) -> None:
    spec = make_spec(anchor, "pwd", directory=str(separate_mount))
    with pytest.raises(SandboxError) as raised:
        await spawn_sandbox(spec, pipe.write_fd, pipe.write_fd, _launch["server"])
    assert str(raised.value) == (
        f"the directory {separate_mount} is on the host mount {separate_mount}, which the"
        " sandbox does not include (its root is the host's / without the mounts below it):"
        f' add "{separate_mount}" to programs.test.binds'
    )
    bound = make_spec(anchor, "pwd", directory=str(separate_mount), binds=(str(separate_mount),))
    async with sandboxed(bound, pipe) as process:
        assert await pipe.read_to_eof() == f"{separate_mount}\n"
        assert await process.wait() == 0


async def test_spawning_requires_a_child_subreaper(anchor: str, pipe: Pipe) -> None:
    set_child_subreaper(False)
    try:
        with pytest.raises(SandboxError, match="become_subreaper"):
            await spawn_sandbox(make_spec(anchor, "true"), pipe.write_fd, pipe.write_fd)
    finally:
        become_subreaper()


HANGING_LAUNCHER = """
import os, sys, time
status_fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(status_fd)
    time.sleep(1000)
    os._exit(0)
os.write(status_fd, b'{"pid": %d}\\n' % pid)
time.sleep(1000)
"""


async def test_a_hung_launcher_is_killed_with_the_program_it_forked(
    anchor: str, pipe: Pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = tmp_path / "hanging_launcher.py"
    launcher.write_text(HANGING_LAUNCHER)
    monkeypatch.setattr(
        sandbox_process, "_launcher_command", lambda: [sys.executable, str(launcher)]
    )
    monkeypatch.setattr(sandbox_process, "LAUNCH_TIMEOUT", 0.5)
    with pytest.raises(SandboxError, match=r"did not start 'test' within 0\.5 s"):
        await spawn_sandbox(make_spec(anchor, "true"), pipe.write_fd, pipe.write_fd)
    # The autouse fixture checks that neither the launcher nor its child is left.


async def test_a_launcher_not_built_is_a_fatal_error_saying_how_to_build_it(
    anchor: str, pipe: Pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "HELPERS_DIR", str(tmp_path))
    with pytest.raises(SandboxError, match=r"grenadine-launch is missing.*C compiler") as raised:
        await spawn_sandbox(
            make_spec(anchor, "true"), pipe.write_fd, pipe.write_fd, _launch["server"]
        )
    assert raised.value.fatal


def test_adopt_refuses_a_process_that_is_not_our_child() -> None:
    with pytest.raises(SandboxError, match="not a child of this process"):
        SandboxProcess.adopt(os.getppid(), under_init=False)


async def test_sigkill_to_pid_1_ends_every_process_of_the_sandbox(anchor: str, pipe: Pipe) -> None:
    spec = make_spec(anchor, "sh", "-c", "sleep 1000 & sleep 1000 & wait")
    async with sandboxed(spec, pipe) as process:
        children_file = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        await wait_for(lambda: len(children_file.read_text().split()) == 2, BOUND)
        children = {
            int(pid): read_start_time(int(pid)) for pid in children_file.read_text().split()
        }
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    for pid, start_time in children.items():
        assert not _same_process_alive(pid, start_time), f"child {pid} outlived PID 1"


def _same_process_alive(pid: int, start_time: int) -> bool:
    try:
        return read_start_time(pid) == start_time
    except FileNotFoundError:
        return False


async def test_pid_1_ignores_unhandled_sigterm_but_not_sigkill(anchor: str, pipe: Pipe) -> None:
    spec = make_spec(anchor, "sh", "-c", "while :; do echo tick; sleep 0.02; done")
    async with sandboxed(spec, pipe) as process:
        await pipe.read_until(lambda received: b"tick" in received)
        process.send_signal(signal.SIGTERM)
        ticks_at_signal = pipe.received.count(b"tick")
        # A SIGTERM that arrived while sh had signals blocked (around vfork) is delivered, and
        # dropped, on unblocking: two more ticks prove the loop went on past that point.
        await pipe.read_until(lambda received: received.count(b"tick") >= ticks_at_signal + 2)
        assert process.returncode is None
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        assert await process.wait() == -signal.SIGKILL, "wait() is idempotent"
        process.send_signal(signal.SIGTERM)  # a no-op once reaped


# CRIU round trip: keeps its pycriu calls here; the criu module will own them in the program.


def criu_binary() -> str:
    for path in CRIU_BINARIES:
        if os.access(path, os.X_OK):
            return path
    pytest.skip("no CRIU >= 4.2 binary found")


def memcached_says(port: int, request: bytes) -> bytes:
    """Send ``request`` then 'quit', so memcached itself closes the connection before a dump."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as connection:
        connection.sendall(request + b"quit\r\n")
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
        return reply


async def wait_until_serving(port: int) -> None:
    with trio.fail_after(BOUND):
        while True:
            try:
                memcached_says(port, b"version\r\n")
            except ConnectionRefusedError:
                await trio.sleep(0.02)
            else:
                return


def criu_dump(pycriu: Any, binary: str, images_fd: int, pid: int) -> None:
    checkpointer = pycriu.criu()
    checkpointer.use_binary(binary)
    checkpointer.opts.images_dir_fd = images_fd
    checkpointer.opts.pid = pid
    checkpointer.opts.external.append("mnt[]")
    checkpointer.opts.leave_running = False
    checkpointer.opts.log_file = "dump.log"
    checkpointer.opts.log_level = 4
    checkpointer.dump()


def criu_restore(pycriu: Any, binary: str, images_fd: int, pipe_inode: int, stdout_fd: int) -> int:
    restorer = pycriu.criu()
    restorer.use_binary(binary)
    restorer.opts.images_dir_fd = images_fd
    restorer.opts.root = "/"
    restorer.opts.external.append("mnt[]")
    restorer.opts.rst_sibling = True
    restorer.opts.log_file = "restore.log"
    restorer.opts.log_level = 4
    inherited = restorer.opts.inherit_fd.add()
    inherited.key = f"pipe:[{pipe_inode}]"
    inherited.fd = stdout_fd
    pid: int = restorer.restore().pid
    return pid


@pytest.fixture
def images_dir() -> Iterator[int]:
    path = tempfile.mkdtemp(prefix="grenadine-images-")
    images_fd = os.open(path, os.O_DIRECTORY)
    yield images_fd
    os.close(images_fd)
    shutil.rmtree(path)


@pytest.mark.criu
async def test_criu_dumps_and_restores_a_sandboxed_memcached(
    anchor: str, pipe: Pipe, images_dir: int
) -> None:
    pycriu = pytest.importorskip("pycriu")
    binary = criu_binary()
    if shutil.which("memcached") is None:
        pytest.skip("memcached is not installed")
    port = free_port()
    command = ("memcached", "-u", "root", "-p", str(port), "-l", "127.0.0.1", "-vv")
    pipe_inode = os.fstat(pipe.write_fd).st_ino
    async with sandboxed(make_spec(anchor, *command), pipe) as process:
        await wait_until_serving(port)
        assert memcached_says(port, b"set greeting 0 0 5\r\nhello\r\n") == b"STORED\r\n"
        await pipe.read_until(lambda received: b"STORED" in received)
        await trio.to_thread.run_sync(criu_dump, pycriu, binary, images_dir, process.pid)
        assert await process.wait() == -signal.SIGKILL, "CRIU kills the dumped tree"

    restored_output = Pipe()
    try:
        os.set_inheritable(restored_output.write_fd, True)
        restored_pid = await trio.to_thread.run_sync(
            criu_restore, pycriu, binary, images_dir, pipe_inode, restored_output.write_fd
        )
        restored_output.close_write_end()
        restored = SandboxProcess.adopt(restored_pid, under_init=False)
        try:
            assert status_field(restored_pid, "NSpid").endswith("\t1")
            assert restored.pid_ns_inode == ns_inode(restored_pid, "pid") != ns_inode("self", "pid")
            assert os.readlink(f"/proc/{restored_pid}/fd/0") == "/dev/null"
            new_pipe = f"pipe:[{os.fstat(restored_output.stream.fileno()).st_ino}]"
            assert os.readlink(f"/proc/{restored_pid}/fd/1") == new_pipe
            assert os.readlink(f"/proc/{restored_pid}/fd/2") == new_pipe
            reply = memcached_says(port, b"get greeting\r\n")
            assert reply == b"VALUE greeting 0 5\r\nhello\r\nEND\r\n"
            logged = await restored_output.read_until(lambda received: b"get greeting" in received)
            assert b"get greeting" in logged, "the restored program's output reaches the new pipe"
            assert not [point for point in host_mounts() if point.startswith(anchor)]
        finally:
            restored.send_signal(signal.SIGKILL)
            assert await restored.wait() == -signal.SIGKILL
            restored.close()
    finally:
        restored_output.close_write_end()
        await restored_output.stream.aclose()


async def end_all(processes: list[SandboxProcess], pipes: list[Pipe]) -> None:
    """End the sandboxes a test started, by pid, and close its pipes."""
    for process in processes:
        process.send_signal(signal.SIGKILL)
        await process.wait()
        process.close()
    for pipe in pipes:
        pipe.close_write_end()
        await pipe.stream.aclose()


async def test_the_launcher_server_launches_at_once_and_comes_back_after_it_died(
    anchor: str, launcher_server: LauncherServer | None
) -> None:
    if launcher_server is None:
        pytest.skip("about the launcher server only")
    pipes = [Pipe() for _ in range(4)]
    processes: list[SandboxProcess] = []
    try:
        async with trio.open_nursery() as nursery:

            async def one(pipe: Pipe) -> None:
                spec = make_spec(anchor, "sh", "-c", "echo up; exec sleep 1000")
                processes.append(
                    await spawn_sandbox(spec, pipe.write_fd, pipe.write_fd, launcher_server)
                )
                pipe.close_write_end()

            for pipe in pipes:
                nursery.start_soon(one, pipe)
        first_server = launcher_server.pid
        assert first_server is not None
        assert len({p.pid_ns_inode for p in processes}) == len(pipes)
        for process, pipe in zip(processes, pipes, strict=True):
            assert int(status_field(process.pid, "PPid")) == os.getpid()
            assert await pipe.read_until(lambda got: b"up" in got) == b"up\n"

        os.kill(first_server, signal.SIGKILL)
        # Until it is a zombie, its socket may still be open (its memory goes first).
        with trio.fail_after(BOUND):
            await trio.to_thread.run_sync(
                os.waitid, os.P_PID, first_server, os.WEXITED | os.WNOWAIT
            )
        again = Pipe()
        pipes.append(again)
        spec = make_spec(anchor, "sh", "-c", "echo again; exec sleep 1000")
        processes.append(await spawn_sandbox(spec, again.write_fd, again.write_fd, launcher_server))
        again.close_write_end()
        assert launcher_server.pid not in (None, first_server)
        assert await again.read_until(lambda got: b"again" in got) == b"again\n"
    finally:
        with trio.CancelScope(shield=True):
            await end_all(processes, pipes)


async def test_a_launch_held_in_its_fork_does_not_hold_up_the_next(
    anchor: str, launcher_server: LauncherServer | None, tmp_path: Path
) -> None:
    """The server forks each launch and answers it when that fork ends, so launches overlap.
    One launch is held in its fork (its cgroup.procs is a FIFO nobody reads yet: joining the
    cgroup blocks); another is launched and runs meanwhile; then the first goes on."""
    if launcher_server is None:
        pytest.skip("about the launcher server only")
    held_cgroup = tmp_path / "held-cgroup"
    held_cgroup.mkdir()
    os.mkfifo(held_cgroup / "cgroup.procs")
    held_pipe, quick_pipe = Pipe(), Pipe()
    processes: list[SandboxProcess] = []
    try:
        async with trio.open_nursery() as nursery:

            async def held() -> None:
                spec = make_spec(anchor, "sh", "-c", "echo held; exec sleep 1000")
                spec = dataclasses.replace(spec, cgroup=str(held_cgroup))
                processes.append(
                    await spawn_sandbox(
                        spec, held_pipe.write_fd, held_pipe.write_fd, launcher_server
                    )
                )

            nursery.start_soon(held)
            await wait_for(
                lambda: launcher_server.pid is not None and bool(children_of(launcher_server.pid)),
                BOUND,
                "the held launch's fork",
            )
            spec = make_spec(anchor, "sh", "-c", "echo quick; exec sleep 1000")
            with trio.fail_after(BOUND):
                processes.append(
                    await spawn_sandbox(
                        spec, quick_pipe.write_fd, quick_pipe.write_fd, launcher_server
                    )
                )
            assert len(processes) == 1, "the held launch is still held"
            quick_pipe.close_write_end()
            assert await quick_pipe.read_until(lambda got: b"quick" in got) == b"quick\n"
            with open(held_cgroup / "cgroup.procs", "rb") as fifo:  # lets the held fork go on
                assert fifo.read() == b"0\n"
        held_pipe.close_write_end()
        assert await held_pipe.read_until(lambda got: b"held" in got) == b"held\n"
        assert len(processes) == 2
    finally:
        with contextlib.suppress(OSError):  # a fork still held: let it go (and fail)
            os.close(os.open(held_cgroup / "cgroup.procs", os.O_RDONLY | os.O_NONBLOCK))
        with trio.CancelScope(shield=True):
            await end_all(processes, [held_pipe, quick_pipe])


async def test_launches_in_flight_fail_when_the_launcher_server_dies(
    anchor: str, launcher_server: LauncherServer | None, tmp_path: Path
) -> None:
    """Two launches held in their forks; the server is killed: both fail at once with the
    reason (none waits for an answer that cannot come), and the next launch starts a new
    server."""
    if launcher_server is None:
        pytest.skip("about the launcher server only")
    fifos = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        os.mkfifo(tmp_path / name / "cgroup.procs")
        fifos.append(tmp_path / name / "cgroup.procs")
    pipes = [Pipe(), Pipe(), Pipe()]
    failures: list[str] = []
    processes: list[SandboxProcess] = []
    try:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:

                async def held(fifo: Path, pipe: Pipe) -> None:
                    spec = make_spec(anchor, "sh", "-c", "exec sleep 1000")
                    spec = dataclasses.replace(spec, cgroup=str(fifo.parent))
                    fd = pipe.write_fd
                    try:
                        processes.append(await spawn_sandbox(spec, fd, fd, launcher_server))
                    except SandboxError as error:
                        failures.append(str(error))

                for fifo, pipe in zip(fifos, pipes, strict=False):
                    nursery.start_soon(held, fifo, pipe)
                await wait_for(
                    lambda: (
                        launcher_server.pid is not None
                        and len(children_of(launcher_server.pid)) == 2
                    ),
                    BOUND,
                    "two held forks",
                )
                server = launcher_server.pid
                assert server is not None
                os.kill(server, signal.SIGKILL)
        assert len(failures) == 2, failures
        assert all("the sandbox launcher" in failure and "died" in failure for failure in failures)
        assert processes == []
        spec = make_spec(anchor, "sh", "-c", "echo again; exec sleep 1000")
        fd = pipes[2].write_fd
        processes.append(await spawn_sandbox(spec, fd, fd, launcher_server))
        assert launcher_server.pid not in (None, server)
        pipes[2].close_write_end()
        assert await pipes[2].read_until(lambda got: b"again" in got) == b"again\n"
    finally:
        for fifo in fifos:  # the orphaned forks go on, find no reader, and fail
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        with trio.CancelScope(shield=True):
            await end_all(processes, pipes)
