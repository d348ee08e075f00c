"""The supervisor: one trio nursery holding the control socket, the metrics endpoint, the
signal handlers and the programs; a clean shutdown, and no program outliving it."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

from grenadine_sv.config.loading import Config
from grenadine_sv.control import server as control
from grenadine_sv.control.handler import RequestHandler
from grenadine_sv.keeper.client import KeeperError, StdioKeeper, key_program
from grenadine_sv.sandbox import SandboxError, become_subreaper
from grenadine_sv.sandbox.cgroup import CgroupUnavailable, ProgramCgroups
from grenadine_sv.store.trust import UntrustedPath, check_trusted_dir, check_trusted_to_create
from grenadine_sv.supervisor.checkpointing import Checkpointing
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.operations import Operations
from grenadine_sv.supervisor.output import check_log_files
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.supervisor.recovery import Recovery, StateDirBusy, state_dir_lock

if TYPE_CHECKING:  # prometheus_client is loaded only when the endpoint is enabled
    from grenadine_sv.metrics.collector import Metrics
    from grenadine_sv.supervisor.remote import RemoteImages

log = structlog.get_logger()


PID_FILE = "grenadine-sv.pid"


def write_pid_file(path: Path) -> None:
    """The supervisor's pid, 0600 like all of state_dir (`grenadine-sv pid` asks the socket)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


class StartupError(Exception):
    """The supervisor cannot start; the message says why and what to do."""

    def __init__(self, message: str, *, configuration: bool = False) -> None:
        super().__init__(message)
        # True when the configuration cannot work here (exit 2 rather than 1).
        self.configuration = configuration


def prepare_state_dir(path: Path) -> None:
    """Create state_dir 0700, or refuse one that other users can write or reach."""
    if not path.exists():
        try:
            check_trusted_to_create(path, what="state_dir")
        except UntrustedPath as exc:
            raise StartupError(f"{exc} (state_dir holds process memory)") from exc
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    mode = info.st_mode
    if info.st_uid != os.geteuid():
        raise StartupError(
            f"state_dir {path} belongs to uid {info.st_uid}, not to this supervisor's user "
            f"(uid {os.geteuid()}); it holds process memory: chown it or choose another"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(
            f"state_dir {path} is writable by other users (mode {stat.S_IMODE(mode):o}); "
            f"it holds process memory: chmod 700 {path}"
        )
    try:
        check_trusted_dir(path, what="state_dir")
    except UntrustedPath as exc:
        raise StartupError(f"{exc} (state_dir holds process memory)") from exc


def prepare_log_files(config: Config) -> None:
    """Create log_dir, and refuse a log directory or file other users could swap or plant."""
    log_dir = config.supervisor.log_dir
    try:
        check_trusted_to_create(log_dir, what="log_dir")
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        check_trusted_dir(log_dir, what="log_dir")
        check_log_files(
            path
            for program in config.programs.values()
            for path in (program.stdout_path(log_dir), program.stderr_path(log_dir))
        )
    except UntrustedPath as exc:
        raise StartupError(f"{exc} (program output may hold secrets)") from exc


class Supervisor:
    """Runs everything a configuration describes until asked to stop (SIGTERM, SIGINT or the
    `shutdown` request): SIGHUP reloads, SIGUSR1 starts a checkpoint round. The work itself
    is done by its parts: `programs` (runners, start and stop order), `deploys` (reload),
    `checkpointing` (policies and checkpoint requests), `recovery` (state file, orphans);
    build.build_supervisor wires them."""

    def __init__(
        self,
        config: Config,
        *,
        programs: Programs,
        deploys: Deploys,
        checkpointing: Checkpointing,
        recovery: Recovery,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.programs = programs
        self.deploys = deploys
        self.checkpointing = checkpointing
        self.recovery = recovery
        self.metrics = metrics
        self.operations = Operations(programs, deploys, checkpointing, self.request_shutdown)
        self._shutdown = trio.Event()
        self._started = False

    @property
    def state_dir(self) -> Path:
        return self.config.supervisor.state_dir

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        prepare_state_dir(self.state_dir)
        prepare_log_files(self.config)
        try:
            with state_dir_lock(self.state_dir) as lock:
                if self.checkpointing.service is not None:
                    # CRIU dumps hold the lock too: see recovery.state_dir_lock.
                    self.checkpointing.service.hold_fds = (lock.fileno(),)
                await self._run_locked(task_status)
        except StateDirBusy as exc:
            raise StartupError(str(exc)) from exc

    async def _stop_programs(self) -> None:
        """At shutdown: the on_stop checkpoints first, then every program in dependency
        order (dependents are not stopped for their dependencies: all of them stop)."""
        log.info("supervisor_stopping")
        self.programs.shutting_down = True
        await self.checkpointing.checkpoint_at_shutdown(
            self.config.supervisor.shutdown_checkpoint_timeout
        )
        await self.programs.stop_programs(list(self.programs.runners))

    def _start_sandbox_server(self) -> None:
        try:
            self.programs.sandbox_server.start()
        except SandboxError as exc:  # its launcher was not built
            raise StartupError(str(exc)) from exc

    async def _run_locked(self, task_status: trio.TaskStatus[None]) -> None:
        # Claimed before anything is started: a supervisor refused here (another one answers
        # on this socket) leaves no keeper, launcher or cgroup behind.
        sock = control.bind_socket(self.config.supervisor.control_socket)
        announced = False
        try:
            remote = await self._prepare()
            write_pid_file(self.pid_file)
            log.info(
                "supervisor_started",
                pid=os.getpid(),
                config=str(self.config.path),
                programs=len(self.config.programs),
            )
            announced = True
            await self._serve(sock, remote, task_status)
        finally:
            await self._clean_up(sock, announced=announced)

    async def _prepare(self) -> RemoteImages | None:
        """What the programs need before the first starts: the sandbox launcher, the stdio
        keeper, cgroups, the image store's interrupted writes; the object store, if any."""
        (self.state_dir / "sandbox-root").mkdir(mode=0o700, exist_ok=True)
        become_subreaper()
        # Started before the programs need it, as the stdio keeper is (when none is running).
        self._start_sandbox_server()
        await trio.to_thread.run_sync(self._open_keeper)
        await self._set_up_cgroups()
        partials = await trio.to_thread.run_sync(self.recovery.image_store.recover_partials)
        service = self.checkpointing.service
        remote = service.remote if service is not None else None
        if remote is not None:
            await trio.to_thread.run_sync(remote.remove_stale_downloads)
            await trio.to_thread.run_sync(remote.load_queue, partials.completed)
        return remote

    async def _serve(
        self,
        sock: trio.socket.SocketType,
        remote: RemoteImages | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, sock, RequestHandler(self.operations).handle)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self.checkpointing.signal_rounds.run)
            nursery.start_soon(self.recovery.keep_state_file)
            nursery.start_soon(self.programs.end_extra_copies)
            if self.metrics is not None:
                await self._serve_metrics(nursery, self.metrics)
            if remote is not None:
                nursery.start_soon(remote.run_uploads)
            async with trio.open_nursery() as programs:
                await self._start_programs(programs)
                self._started = True
                task_status.started()
                await self._shutdown.wait()
                await self._stop_programs()
                await self.recovery.write_now()
                programs.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def _clean_up(self, sock: trio.socket.SocketType, *, announced: bool) -> None:
        """Whatever the start got to: no program, helper or empty cgroup outlives it."""
        with trio.CancelScope(shield=True):
            await self.programs.kill_leftovers()
            # Not started: a predecessor's orphans may be there; remove only empty ones.
            await self.programs.remove_cgroups(end_strays=self._started)
        self.programs.sandbox_server.close()
        keeper = self.programs.keeper
        if keeper is not None:
            # Once started, every program has ended here; before that, a previous
            # supervisor's programs may still need the keeper, unless this one started it.
            keeper.close(stop_keeper=self._started or keeper.pid is not None)
        sock.close()
        control_socket = self.config.supervisor.control_socket
        if control_socket.is_socket():
            control_socket.unlink()
        self.pid_file.unlink(missing_ok=True)
        if announced:
            log.info("supervisor_stopped")

    async def _set_up_cgroups(self) -> None:
        """A cgroup per program when the host has a usable cgroup v2 hierarchy."""
        try:
            cgroups = await trio.to_thread.run_sync(ProgramCgroups.for_state_dir, self.state_dir)
        except CgroupUnavailable as exc:
            log.warning("cgroups_unavailable", reason=str(exc))
        else:
            self.programs.cgroups = self.recovery.cgroups = cgroups

    async def _start_programs(self, nursery: trio.Nursery) -> None:
        """Take back a crashed predecessor's programs, then start those that autostart."""
        self.programs.attach(nursery)
        leftovers = await trio.to_thread.run_sync(self._take_leftover_pipes)
        recovered = await self.recovery.take_back_orphans(self.config)
        order = self.config.start_order()
        await self.checkpointing.learn_last_checkpoints(order)
        for name in order:
            await self.programs.add(self.config.programs[name])
        self._hand_over_leftover_output(leftovers)
        self.programs.autostart(order, recovered)

    def _open_keeper(self) -> None:
        """Find or start the stdio keeper."""
        try:
            self.programs.keeper = StdioKeeper.connect_or_start(self.state_dir)
        except (KeeperError, OSError) as exc:
            log.error("stdio_keeper_unavailable", error=str(exc))

    def _take_leftover_pipes(self) -> dict[str, int]:
        """Copies of the pipes the keeper held for a previous supervisor's instances (their
        output while no supervisor ran), by key."""
        keeper = self.programs.keeper
        if keeper is None:
            return {}
        try:
            return keeper.take_all()
        except (KeeperError, OSError) as exc:
            log.error("stdio_keeper_unavailable", error=str(exc))
            return {}

    def _hand_over_leftover_output(self, leftovers: dict[str, int]) -> None:
        """After the orphans are dumped or stopped: their pipes into their programs' logs."""
        for key, read_fd in leftovers.items():
            runner = self.programs.runners.get(key_program(key))
            if runner is not None:
                runner.take_leftover_output(key, read_fd)
                continue
            os.close(read_fd)  # a program no longer configured: nowhere to write it
            self.programs.context().release_pipes((key,))

    async def _serve_metrics(self, nursery: trio.Nursery, metrics: Metrics) -> None:
        address = self.config.supervisor.metrics.address()
        if address is None:
            return
        host, port = address
        for name in self.config.programs:
            metrics.add_program(name)
        from grenadine_sv.metrics.endpoint import MetricsListenError, serve_metrics

        try:
            await nursery.start(serve_metrics, metrics, host, port)
        except MetricsListenError as exc:
            message = f"{self.config.path}: supervisor.metrics.listen: {exc}"
            raise StartupError(message, configuration=True) from exc

    async def _watch_signals(self) -> None:
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal_shutdown", signal=signal.Signals(signum).name)
                    self.request_shutdown()
                elif signum == signal.SIGHUP:
                    self.programs.nursery.start_soon(self.deploys.reload_logging_errors)
                elif signum == signal.SIGUSR1:
                    self.checkpointing.on_checkpoint_signal()
