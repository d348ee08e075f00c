"""Drives one program: feeds its state machine with events and carries out its actions."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any, Literal

import structlog
import trio

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.keeper.client import key_stream
from grenadine_sv.lifecycle.machine import (
    Action,
    BackoffElapsed,
    BecameReady,
    Event,
    Exited,
    Kill,
    LifecyclePolicy,
    ProgramMachine,
    ReadyFailed,
    ScheduleKill,
    ScheduleRetry,
    SendStopSignal,
    Spawn,
    Spawned,
    SpawnFailed,
    StartRefused,
    StartRequested,
    State,
    StopAborted,
    StopRequested,
    StopTimeout,
    WatchReadiness,
    describe_returncode,
    signal_name,
)
from grenadine_sv.sandbox import (
    SandboxError,
    SandboxProcess,
)
from grenadine_sv.sandbox.cgroup import ProgramCgroup
from grenadine_sv.supervisor.cold_start import launch_cold
from grenadine_sv.supervisor.instance import LaunchedInstance, RestoredFrom, RunnerContext
from grenadine_sv.supervisor.membership import claim, instance_listens_on, move_into
from grenadine_sv.supervisor.output import (
    RotatingLogFile,
    drain_available,
    pump_output,
)
from grenadine_sv.supervisor.probes import ProbeFailed, wait_until_ready

# Kept importable from here, where the rest of the project takes them from.
__all__ = [
    "LaunchedInstance",
    "Launcher",
    "ProgramRunner",
    "RestoredFrom",
    "RunnerContext",
    "StartCause",
    "StateObserver",
    "launch_cold",
    "lifecycle_policy",
]

StateObserver = Callable[["ProgramRunner", State, State], None]


WAITING_STATES = frozenset({State.STARTING, State.BACKOFF, State.STOPPING})
STARTED_WHILE_STOPPING = "it was stopping when the start was asked: start it again"


# A launcher starts an instance of the program: from scratch, or from an image.
Launcher = Callable[["ProgramRunner"], Awaitable[LaunchedInstance]]

# Why an instance starts: the supervisor starting, an operator's start or restart (a
# reload's too), the supervisor restarting it after an exit or a failed start, or a
# dependency that runs again (on_dependency_stop = "restart").
StartCause = Literal["supervisor-start", "start", "crash", "dependency"]


def lifecycle_policy(config: ProgramConfig) -> LifecyclePolicy:
    return LifecyclePolicy(
        autorestart=config.autorestart,
        exitcodes=frozenset(config.exitcodes),
        startsecs=config.startsecs,
        startretries=config.startretries,
        stopwaitsecs=config.stopwaitsecs,
        has_ready_probe=config.ready is not None,
    )


class ProgramRunner:
    """Drives one program: feeds its ProgramMachine with events (requests, a spawn, an exit,
    readiness, timers) and carries out the actions that come back, in one trio task of its
    own. Each instance starts through a launcher: the runner's own (a cold start, or the
    pinned image) or the one a start names (a restore, a rollback, a recovery). Other parts
    of the supervisor ask it; none writes to its machine."""

    def __init__(
        self, config: ProgramConfig, context: RunnerContext, launcher: Launcher | None = None
    ) -> None:
        self.config = config
        self.context = context
        self.machine = ProgramMachine(lifecycle_policy(config))
        self.process: SandboxProcess | None = None
        self.log = structlog.get_logger().bind(program=config.name)
        self._send, self._receive = trio.open_memory_channel[Event](math.inf)
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.stdout_log = RotatingLogFile(
            config.stdout_path(context.log_dir),
            config.stdout_logfile_maxbytes,
            config.stdout_logfile_backups,
            timestamps=config.log_timestamps,
        )
        self.stderr_log = RotatingLogFile(
            config.stderr_path(context.log_dir),
            config.stderr_logfile_maxbytes,
            config.stderr_logfile_backups,
            timestamps=config.log_timestamps,
        )
        self._launcher = launcher or launch_cold
        # Instances that start another way than `launcher` (a restore, a recovery).
        self._launchers: dict[int, Launcher] = {}
        # Why each requested instance starts; an instance nobody asked for is a restart.
        self._causes: dict[int, StartCause] = {}
        self.start_cause: StartCause = "supervisor-start"
        # None while the current instance started from scratch (or none runs).
        self.restored_from: RestoredFrom | None = None
        # Above 0 while a restore, a rollback or a checkpoint that stops the program is under
        # way: its stop and start are not passed on to the programs that depend on it.
        self.dependents_unaffected = 0
        # Above 0 while a start of the program waits for its dependencies to run.
        self.dependency_waits = 0
        # Set once the runner is dropped (its program removed, or replaced by a reload).
        self.retired = False
        # Stops asked of the program (a restore's own stop aside): one that grew during a
        # restore was asked during it, and wins.
        self.stops_asked = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def cgroup(self) -> ProgramCgroup | None:
        cgroups = self.context.cgroups
        return cgroups.of(self.name) if cgroups is not None else None

    async def claim_cgroup(self) -> None:
        """Before an instance starts: the program's cgroup is empty and records the
        definition about to run (membership.claim)."""
        if self.cgroup is not None:
            await claim(
                self.cgroup,
                self.config.definition_digest(),
                self.name,
                self.context.preparation_threads,
            )

    def owns_listener(self, port: int) -> bool:
        """True when the listener on `port` belongs to this runner's current instance."""
        process = self.process
        if process is None or process.returncode is not None:
            return False
        return instance_listens_on(port, self.cgroup, process.pid_ns_inode)

    @property
    def state(self) -> State:
        return self.machine.state

    def uptime(self) -> float | None:
        started = self.machine.started_at
        if started is None or self.state != State.RUNNING:
            return None
        return trio.current_time() - started

    @contextlib.contextmanager
    def leaving_dependents_alone(self) -> Iterator[None]:
        """Within this, the program's stops and starts do not stop or start its dependents."""
        self.dependents_unaffected += 1
        try:
            yield
        finally:
            self.dependents_unaffected -= 1

    @contextlib.contextmanager
    def waiting_for_dependencies(self) -> Iterator[None]:
        """Within this, a start of the program waits for its dependencies."""
        self.dependency_waits += 1
        try:
            yield
        finally:
            self.dependency_waits -= 1

    def retire(self) -> None:
        """The runner is dropped: whoever waits on it wakes (to find its successor)."""
        self.retired = True
        self._changed.set()
        self._changed = trio.Event()

    def restored_image_created(self) -> datetime | None:
        """When the image the running instance was restored from was made (None: cold,
        or not running)."""
        if self.restored_from is None or self.process is None:
            return None
        if self.process.returncode is not None:
            return None
        return self.restored_from.created

    def update_config(self, config: ProgramConfig) -> None:
        """Take a definition whose process-affecting part is unchanged (policies, probes)."""
        self.config = config
        self.machine.policy = lifecycle_policy(config)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for event in self._receive:
                    self._dispatch(event)
        finally:
            self.stdout_log.close()
            self.stderr_log.close()

    def _post(self, event: Event) -> None:
        self._send.send_nowait(event)

    # Requests are handled at once rather than queued, so the state has changed on return.

    def request_start(
        self, launcher: Launcher | None = None, cause: StartCause = "start"
    ) -> int | None:
        """Start the program (if it is not active), through `launcher` for this instance.
        Returns the instance started (None: it was active, nothing started)."""
        before = self.machine.instance
        self._dispatch(StartRequested(trio.current_time()))
        if self.machine.instance == before:
            return None
        self._causes[self.machine.instance] = cause
        if launcher is not None:
            self._launchers[self.machine.instance] = launcher
        return self.machine.instance

    def refuse_start(self, reason: str) -> None:
        """A start that cannot happen: the program stays as it is and shows why."""
        self._dispatch(StartRefused(reason, trio.current_time()))

    def request_stop(self, *, replacing: bool = False) -> None:
        """Stop the program; `replacing` when the caller starts another instance next."""
        if not replacing:
            self.stops_asked += 1
        self._dispatch(StopRequested(trio.current_time()))

    def stop_for_checkpoint(self) -> int:
        """The running instance is being dumped and then ended by the checkpoint itself (no
        stop signal): STOPPING until it exits. Returns the instance, for resume_instance."""
        self._dispatch(StopRequested(trio.current_time(), by_checkpoint=True))
        return self.machine.instance

    def resume_instance(self, instance: int) -> None:
        """The checkpoint that was to end `instance` failed: it goes on RUNNING."""
        self._dispatch(StopAborted(instance, trio.current_time()))

    def running_process(self) -> SandboxProcess | None:
        """The process of the RUNNING instance; None in any other state."""
        if self.state != State.RUNNING or self.machine.pid is None:
            return None
        return self.process

    async def wait_until(self, predicate: Callable[[State], bool], timeout: float) -> State:
        """The state once `predicate` holds for it, `timeout` has passed or the runner has
        been retired (its state then changes no more)."""
        with trio.move_on_after(timeout):
            while not predicate(self.state) and not self.retired:
                await self._changed.wait()
        return self.state

    async def start(
        self, timeout: float, launcher: Launcher | None = None, cause: StartCause = "start"
    ) -> State:
        """Start and wait until the start has succeeded or failed (or `timeout`). A start
        asked while the program stops is not carried out, and the program shows why."""
        stopping = self.state == State.STOPPING
        self.request_start(launcher, cause)
        state = await self.settled(timeout)
        if stopping and state in (State.STOPPED, State.EXITED):
            self.refuse_start(STARTED_WHILE_STOPPING)
        return state

    async def stop(self, timeout: float, *, replacing: bool = False) -> State:
        self.request_stop(replacing=replacing)
        return await self.settled(timeout)

    async def settled(self, timeout: float) -> State:
        """Wait until the program is neither starting nor stopping (or `timeout`)."""
        return await self.wait_until(lambda s: s not in WAITING_STATES, timeout)

    def stop_timeout_bound(self) -> float:
        return self.config.stopwaitsecs + 5.0

    # event loop --------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        before = self.machine.state
        if isinstance(event, Exited) and event.instance == self.machine.instance:
            self._log_exit(before, event.returncode)
        actions = self.machine.handle(event)
        after = self.machine.state
        if before != after or isinstance(event, Spawned):
            self._announce(before, after)
        for action in actions:
            self._perform(action)

    def _log_exit(self, state: State, returncode: int) -> None:
        """Every exit with its cause: the exit status, or the signal that ended it."""
        fields: dict[str, Any] = {
            "state": state.value,
            "pid": self.machine.pid,
            "exit": describe_returncode(returncode),
        }
        if returncode < 0:
            fields["signal"] = signal_name(-returncode)
        else:
            fields["exit_status"] = returncode
        expected = state == State.STOPPING or (
            returncode >= 0 and returncode in self.config.exitcodes
        )
        level = "info" if expected else "warning"
        getattr(self.log, level)("program_exited", **fields)

    def _announce(self, before: State, after: State) -> None:
        fields: dict[str, Any] = {"from_state": before.value, "to_state": after.value}
        if self.machine.pid is not None:
            fields["pid"] = self.machine.pid
        if self.machine.reason and after in (State.BACKOFF, State.FATAL, State.EXITED):
            fields["reason"] = self.machine.reason
        level = "warning" if after in (State.BACKOFF, State.FATAL) else "info"
        if before != after:
            getattr(self.log, level)("program_state", **fields)
        for observer in self.context.observers:
            observer(self, before, after)
        self._changed.set()
        self._changed = trio.Event()

    def _perform(self, action: Action) -> None:
        assert self._nursery is not None
        match action:
            case Spawn(instance=instance):
                self._nursery.start_soon(self._spawn, instance)
            case WatchReadiness():
                self._nursery.start_soon(self._watch_readiness, action)
            case ScheduleRetry(attempt=attempt, delay=delay):
                self.log.info("backoff", attempt=attempt, delay_seconds=delay)
                self._nursery.start_soon(self._post_later, delay, partial(BackoffElapsed, attempt))
            case SendStopSignal():
                self._signal(self.config.stop_signal)
            case ScheduleKill(instance=instance, delay=delay):
                self._nursery.start_soon(self._post_later, delay, partial(StopTimeout, instance))
            case Kill():
                self.log.warning("stop_timeout_kill", stopwaitsecs=self.config.stopwaitsecs)
                self._signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        """Signal the program's process (an operator's `signal`), if one runs."""
        self.log.info("program_signalled", signal=signal_name(sig))
        self._signal(sig)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)

    async def _post_later(self, delay: float, make_event: Callable[[float], Event]) -> None:
        """After `delay`, post the event made for the time it fires."""
        await trio.sleep(delay)
        self._post(make_event(trio.current_time()))

    async def _spawn(self, instance: int) -> None:
        launcher = self._launchers.pop(instance, self._launcher)
        self.start_cause = self._causes.pop(instance, "crash")
        self.restored_from = None
        try:
            await self.claim_cgroup()
            launched = await launcher(self)
            if self.cgroup is not None:
                move_into(self.cgroup, launched.process.pid, launched.process.pid_ns_inode)
        except Exception as exc:  # whatever goes wrong, only this program's start fails
            if isinstance(exc, SandboxError | OSError):
                self.log.warning("spawn_failed", error=str(exc))
            else:
                self.log.exception("spawn_failed", error=repr(exc))
            fatal = isinstance(exc, SandboxError) and exc.fatal
            reason = str(exc) or repr(exc)
            self._post(SpawnFailed(instance, reason, trio.current_time(), fatal=fatal))
            return
        self._adopt_instance(instance, launched)

    def _adopt_instance(self, instance: int, launched: LaunchedInstance) -> None:
        """Watch a started process: its exit and its output."""
        assert self._nursery is not None
        self.process = launched.process
        self._nursery.start_soon(self._capture_output, launched)
        self._nursery.start_soon(self._watch_exit, instance, launched.process)
        for companion in launched.companions:
            self._nursery.start_soon(companion, launched.process)
        self._post(Spawned(instance, launched.process.pid, trio.current_time()))

    async def _capture_output(self, launched: LaunchedInstance) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump_output, launched.stdout, self.stdout_log)
            nursery.start_soon(pump_output, launched.stderr, self.stderr_log)
        self.context.release_pipes(launched.held)

    def take_leftover_output(self, key: str, read_fd: int) -> None:
        """Output a previous supervisor's instance wrote while no supervisor ran: write what
        its pipe holds to the log now, and the rest (if a writer is left) as it comes."""
        assert self._nursery is not None
        sink = self.stderr_log if key_stream(key) == "stderr" else self.stdout_log
        if drain_available(read_fd, sink):
            os.close(read_fd)
            self.context.release_pipes((key,))
            return
        os.set_blocking(read_fd, True)
        stream = trio.lowlevel.FdStream(read_fd)

        async def pump_rest() -> None:
            with contextlib.closing(stream):
                await pump_output(stream, sink)
            self.context.release_pipes((key,))

        self._nursery.start_soon(pump_rest)

    async def _watch_exit(self, instance: int, process: SandboxProcess) -> None:
        returncode = await process.wait()
        process.close()
        self._post(Exited(instance, returncode, trio.current_time()))

    async def _watch_readiness(self, action: WatchReadiness) -> None:
        ready = self.config.ready
        if not action.use_probe or ready is None:
            await trio.sleep(action.startsecs)
            self._post(BecameReady(action.instance, trio.current_time()))
            return
        try:
            await wait_until_ready(
                tcp=ready.tcp,
                command=ready.command,
                timeout=ready.timeout,
                interval=ready.interval,
                owner=self.owns_listener,
            )
        except ProbeFailed as exc:
            self._post(ReadyFailed(action.instance, str(exc), trio.current_time()))
            return
        self._post(BecameReady(action.instance, trio.current_time()))
