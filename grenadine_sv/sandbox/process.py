"""Supervisor side of the sandbox: start the launcher, learn the program's pid, wait for it."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import select
import signal
import socket
import subprocess
from typing import Any, NoReturn

import trio

from grenadine_sv.helpers import HelperMissing, helper_path
from grenadine_sv.sandbox.init import program_returncode
from grenadine_sv.sandbox.linux import (
    is_subreaper,
    kill_and_reap,
    own_children,
    read_pid_ns_inode,
    read_start_time,
)
from grenadine_sv.sandbox.spec import SandboxSpec
from grenadine_sv.sandbox.visibility import spec_hidden_from_sandbox

LAUNCHER_HELPER = "grenadine-launch"
# The launcher's own constant (grenadine-launch.c).
SERVE_FLAG = "--serve"
LAUNCH_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 4096
SERVER_EXIT_SECONDS = 5.0


class SandboxError(Exception):
    """The sandbox could not start the program; the message says which step failed and why.

    `fatal` when trying again cannot help (the program then goes to FATAL at once)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class SandboxProcess:
    """A sandboxed program: PID 1 of its own PID namespace, and a direct child of this process.

    Waiting and signalling go through a pidfd, and reaping waits for this pid only, so the
    children of trio and pycriu are left to them. With ``under_init``, PID 1 is the sandbox's
    init and the program its child: signals reach the program through the init, and the
    returncode is the program's, decoded from the init's exit status.
    """

    def __init__(
        self, pid: int, pidfd: int, start_time: int, pid_ns_inode: int, *, under_init: bool
    ) -> None:
        self.pid = pid
        self.under_init = under_init
        self.start_time = start_time
        self.pid_ns_inode = pid_ns_inode
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._wait_lock = trio.Lock()

    @classmethod
    def adopt(cls, pid: int, *, under_init: bool) -> SandboxProcess:
        """Take charge of ``pid``, which must already be a child of this process."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise SandboxError(f"cannot adopt pid {pid}: there is no such process") from None
        try:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                raise SandboxError(
                    f"cannot adopt pid {pid}: it is not a child of this process"
                    " (is this process a child subreaper?)"
                ) from None
            return cls(
                pid, pidfd, read_start_time(pid), read_pid_ns_inode(pid), under_init=under_init
            )
        except BaseException:
            os.close(pidfd)
            raise

    def __repr__(self) -> str:
        return (
            f"<SandboxProcess pid={self.pid} under_init={self.under_init}"
            f" returncode={self.returncode}>"
        )

    async def wait(self) -> int:
        """Wait for the program to exit and reap it; negative means killed by that signal."""
        async with self._wait_lock:
            if self.returncode is None:
                await trio.lowlevel.wait_readable(self._open_pidfd())
                _, status = os.waitpid(self.pid, 0)
                returncode = os.waitstatus_to_exitcode(status)
                self.returncode = program_returncode(returncode) if self.under_init else returncode
            return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the program; does nothing once it has been reaped or if it has just exited."""
        if self.returncode is not None:
            return
        pidfd = self._open_pidfd()
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            if not _has_exited(pidfd):
                raise

    def close(self) -> None:
        if self._pidfd is None:
            return
        pidfd, self._pidfd = self._pidfd, None
        with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting on it
            trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)

    def _open_pidfd(self) -> int:
        if self._pidfd is None:
            raise RuntimeError(f"{self!r} was closed")
        return self._pidfd


def _has_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _launcher_command() -> list[str]:
    """The sandbox launcher, grenadine-launch (a small C program); its arguments follow."""
    try:
        return [helper_path(LAUNCHER_HELPER)]
    except HelperMissing as error:
        raise SandboxError(str(error), fatal=True) from None


class LauncherServer:
    """The sandbox launcher started once (`grenadine-launch --serve`): each program is launched
    by a fork of it, and several launches proceed at once. Owned by one supervisor, which
    `close`s it when it ends; started again if it dies."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._launcher = LAUNCHER_HELPER  # its path once started, for messages
        self._socket: socket.socket | None = None
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._request_ids = itertools.count(1)
        self._answers: dict[int, bytes] = {}
        self._abandoned: set[int] = set()  # requests whose caller left (cancelled)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server now, rather than at the first launch."""
        if self._socket is None or not self._running():
            self.close()
            self._start()

    def _start(self) -> socket.socket:
        command = _launcher_command()
        self._launcher = command[0]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [*command, SERVE_FLAG, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's ^C is for the supervisor, not for it
            )
        except OSError as error:
            ours.close()
            raise SandboxError(
                f"cannot start the sandbox launcher {self._launcher}: {error}"
            ) from error
        finally:
            theirs.close()
        ours.setblocking(False)
        self._socket = ours
        return ours

    async def launch(self, spec_wire: bytes, fds: tuple[int, int, int]) -> None:
        """Have the server fork a launch of `spec_wire` (`SandboxSpec.to_wire`) with (stdout,
        stderr, status fd); return once that launch has forked the program and exited (its
        reports go to the status fd)."""
        request_id = next(self._request_ids)
        async with self._send_lock:
            self.start()
            control = self._socket
            assert control is not None
            try:
                await trio.lowlevel.wait_writable(control)
                socket.send_fds(control, [b"%d " % request_id + spec_wire], list(fds))
            except OSError as error:
                self._died(control, f": {error}")
        try:
            await self._answer(control, request_id)
        except BaseException:
            if self._answers.pop(request_id, None) is None:
                self._abandoned.add(request_id)  # its answer, if one comes, is dropped
            raise

    async def _answer(self, control: socket.socket, request_id: int) -> None:
        """Wait for the answer to `request_id`: whoever waits reads the answers of all."""
        while request_id not in self._answers:
            async with self._receive_lock:
                if request_id in self._answers:
                    break
                if control is not self._socket:
                    self._died(control, "")
                try:
                    await trio.lowlevel.wait_readable(control)
                    answer = control.recv(MAX_ANSWER_BYTES)
                except trio.ClosedResourceError:
                    self._died(control, "")
                except OSError as error:
                    self._died(control, f": {error}")
                if not answer:
                    self._died(control, "")
                answered = json.loads(answer).get("id")
                if answered in self._abandoned:
                    self._abandoned.discard(answered)
                elif isinstance(answered, int):
                    self._answers[answered] = answer
        del self._answers[request_id]

    def _died(self, control: socket.socket, detail: str) -> NoReturn:
        if control is self._socket:
            self.close()
        raise SandboxError(f"the sandbox launcher {self._launcher} died{detail}; it restarts")

    def _running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """End the server (it exits when its socket closes; killed if it does not) and reap it."""
        if self._socket is not None:
            with contextlib.suppress(RuntimeError):  # nobody waits on it outside trio.run
                trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
            self._socket = None
            self._abandoned.clear()  # their answers can no longer come
        if self._process is not None:
            try:
                self._process.wait(timeout=SERVER_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            _end_orphaned_launches(self._process.args)
            self._process = None


def _end_orphaned_launches(server_argv: Any) -> None:
    """A server that died (killed) mid-launch leaves its forks, with its command line, to this
    process (a child subreaper; they are re-parented once the server is reaped): end and reap
    them. A launch past its fork has exec'ed the program and has another command line."""
    wanted = b"".join(os.fsencode(str(arg)) + b"\0" for arg in server_argv)
    for pid in own_children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if cmdline.read() == wanted:
                    kill_and_reap(pid)
        except OSError:
            continue


async def spawn_sandbox(
    spec: SandboxSpec, stdout: int, stderr: int, server: LauncherServer | None = None
) -> SandboxProcess:
    """Start ``spec``'s program in a new sandbox, with ``stdout``/``stderr`` as its fds 1 and 2:
    through `server` when given, else by a launcher process of its own.

    Returns once the program has exec'ed; raises SandboxError with the failing step otherwise.
    """
    if not is_subreaper():
        raise SandboxError(
            "cannot start a sandbox: this process is not a child subreaper, so the program would"
            " be re-parented away from it; call become_subreaper() once at start-up"
        )
    hidden = spec_hidden_from_sandbox(spec)
    if hidden is not None:
        raise SandboxError(hidden)
    if server is not None:
        return await _spawn_through(server, spec, stdout, stderr)
    command = _launcher_command()
    read_fd, write_fd = _status_pipe()
    async with trio.lowlevel.FdStream(read_fd) as status:
        try:
            launcher = await trio.lowlevel.open_process(
                [*command, str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(write_fd,),
            )
        except OSError as error:
            raise SandboxError(
                f"cannot start the sandbox launcher {command[0]}: {error}"
            ) from error
        finally:
            os.close(write_fd)
        received = bytearray()
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                await _send_spec(launcher, spec)
                await _read_to_end(status, received)
                await launcher.wait()
        except BaseException as error:
            with trio.CancelScope(shield=True):
                await _abandon(launcher, _parse_reports(received))
            if isinstance(error, trio.TooSlowError):
                raise SandboxError(
                    f"the sandbox launcher did not start {spec.name!r} within {LAUNCH_TIMEOUT:g} s"
                ) from None
            raise
    return await _adopt_reported(spec, _parse_reports(received), launcher.returncode)


async def _adopt_reported(
    spec: SandboxSpec, reports: list[dict[str, Any]], launcher_code: int | None
) -> SandboxProcess:
    """The program a launch reported, or SandboxError with the step that failed."""
    pid = next((report["pid"] for report in reports if "pid" in report), None)
    failure = next((report["error"] for report in reports if "error" in report), None)
    if failure is not None:
        if pid is not None:
            with trio.CancelScope(shield=True):
                await _kill_and_reap(pid)
        raise SandboxError(str(failure))
    if pid is None:
        raise SandboxError(
            f"the sandbox launcher exited with code {launcher_code} without starting"
            f" {spec.name!r} (see the program's stderr)"
        )
    return SandboxProcess.adopt(pid, under_init=spec.init is not None)


async def _spawn_through(
    server: LauncherServer, spec: SandboxSpec, stdout: int, stderr: int
) -> SandboxProcess:
    read_fd, write_fd = _status_pipe()
    received = bytearray()
    async with trio.lowlevel.FdStream(read_fd) as status:
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                try:
                    await server.launch(spec.to_wire(), (stdout, stderr, write_fd))
                finally:
                    os.close(write_fd)
                await _read_to_end(status, received)
        except BaseException as error:
            with trio.CancelScope(shield=True):
                for report in _parse_reports(received):
                    if "pid" in report:
                        await _kill_and_reap(report["pid"])
            if isinstance(error, trio.TooSlowError):
                raise SandboxError(
                    f"the sandbox launcher did not start {spec.name!r} within {LAUNCH_TIMEOUT:g} s"
                ) from None
            raise
    return await _adopt_reported(spec, _parse_reports(received), None)


def _status_pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose write end is above 2, where the launcher's stdio cannot land."""
    read_fd, write_fd = os.pipe()
    if write_fd > 2:
        return read_fd, write_fd
    try:
        return read_fd, fcntl.fcntl(write_fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)


async def _send_spec(launcher: trio.Process, spec: SandboxSpec) -> None:
    if launcher.stdin is None:
        raise RuntimeError("the sandbox launcher was started without a stdin pipe")
    try:
        await launcher.stdin.send_all(spec.to_wire())
        await launcher.stdin.aclose()
    except trio.BrokenResourceError:
        pass  # it died before reading: its status report or exit code says why


async def _read_to_end(stream: trio.lowlevel.FdStream, received: bytearray) -> None:
    while chunk := await stream.receive_some():
        received += chunk


def _parse_reports(received: bytearray) -> list[dict[str, Any]]:
    """One report per complete line (a launcher killed mid-write may leave a partial one)."""
    reports = []
    for line in received.split(b"\n")[:-1]:
        try:
            report = json.loads(line)
        except ValueError:
            report = None
        if not isinstance(report, dict):
            report = {"error": f"the sandbox launcher wrote an unreadable status line: {line!r}"}
        reports.append(report)
    return reports


async def _abandon(launcher: trio.Process, reports: list[dict[str, Any]]) -> None:
    """Kill the launcher and, once it is reaped (so it is our child), the program it forked."""
    with contextlib.suppress(ProcessLookupError):
        launcher.kill()
    await launcher.wait()
    for report in reports:
        if "pid" in report:
            await _kill_and_reap(report["pid"])


async def _kill_and_reap(pid: int) -> None:
    process = SandboxProcess.adopt(pid, under_init=False)
    try:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    finally:
        process.close()
