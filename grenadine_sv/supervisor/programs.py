"""The running programs: one runner task each, started and stopped in dependency order."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from grenadine_sv.config.loading import Config, ProgramConfig
from grenadine_sv.control.protocol import ControlError
from grenadine_sv.keeper.client import StdioKeeper
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.sandbox import LauncherServer
from grenadine_sv.sandbox.cgroup import ProgramCgroups
from grenadine_sv.supervisor.instance import preparation_limiter
from grenadine_sv.supervisor.membership import CensusCadence, CopyCensus, emptied
from grenadine_sv.supervisor.runner import (
    Launcher,
    ProgramRunner,
    RunnerContext,
    StartCause,
    StateObserver,
)

if TYPE_CHECKING:  # prometheus_client is loaded only when the endpoint is enabled
    from grenadine_sv.metrics.collector import Metrics

log = structlog.get_logger()

DEPENDENCY_WAIT_SECONDS = math.inf
# A dependent in these states is stopped when its dependency stops.
ACTIVE_OR_RETRYING = frozenset({State.STARTING, State.RUNNING, State.BACKOFF})


class ProgramListener(Protocol):
    """Told when a runner joins, changes its definition in place, or leaves."""

    async def program_added(self, runner: ProgramRunner) -> None: ...

    def program_updated(self, runner: ProgramRunner) -> None: ...

    def program_forgotten(self, name: str) -> None: ...


def start_timeout_bound(program: ProgramConfig) -> float:
    """How long a start may take at most, every retry included."""
    probe = program.ready.timeout if program.ready is not None else program.startsecs
    return (probe + program.stopwaitsecs + 65.0) * (program.startretries + 1)


class Programs:
    """The configured programs' runners, each in its own task of one nursery, and the
    dependency-ordered starts and stops a user, a deploy or a shutdown asks for."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        observers: Iterable[StateObserver] = (),
        launcher: Launcher | None = None,
    ) -> None:
        self.config = config
        # How every instance starts unless a start says otherwise.
        self.launcher = launcher
        self.metrics = metrics
        self.runners: dict[str, ProgramRunner] = {}
        self.listeners: list[ProgramListener] = []
        self._observers = (*tuple(observers), self._count_restarts, self._follow_dependencies)
        # Dependents stopped because this dependency stopped, to start again when it runs.
        self._stopped_for: dict[str, str] = {}
        # Set at shutdown: every program stops anyway, in dependency order.
        self.shutting_down = False
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        # Launches every sandbox by a fork (started at the first launch, closed at the end).
        self.sandbox_server = LauncherServer()
        # Set by the supervisor once it runs: the holder of the output pipes.
        self.keeper: StdioKeeper | None = None
        # Set by the supervisor once it runs: a cgroup per program, when the host has them.
        self.cgroups: ProgramCgroups | None = None
        self.preparation_threads = preparation_limiter()
        # Renewed whenever a runner joins or leaves.
        self._roster_changed = trio.Event()

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery the runners (and tasks that live as long as they do) run in."""
        assert self._nursery is not None, "programs are not running"
        return self._nursery

    def context(self) -> RunnerContext:
        return RunnerContext(
            log_dir=self.config.supervisor.log_dir,
            root_anchor=self.config.supervisor.state_dir / "sandbox-root",
            state_dir=self.config.supervisor.state_dir,
            observers=self._observers,
            sandbox_server=self.sandbox_server,
            keeper=self.keeper,
            cgroups=self.cgroups,
            preparation_threads=self.preparation_threads,
        )

    async def end_extra_copies(self) -> None:
        """A copy that turns up in a running program's cgroup beside its instance (a restore
        that a killed supervisor left running, say) is ended: one instance per program."""
        census, cadence = CopyCensus(), CensusCadence()
        while True:
            await trio.sleep(cadence.seconds)
            instances = [
                (runner.cgroup, runner.process.pid_ns_inode)
                for runner in self.runners.values()
                if runner.cgroup is not None
                and runner.process is not None
                and runner.process.returncode is None
                and runner.state == State.RUNNING
            ]
            ended = await trio.to_thread.run_sync(census.end_copies, instances)
            for program, pids in ended.items():
                log.warning("extra_copies_ended", program=program, pids=pids)
            cadence.after([(cgroup.path, inode) for cgroup, inode in instances], bool(ended))

    async def remove_cgroups(self, *, end_strays: bool) -> None:
        """Remove the programs' empty cgroups; with `end_strays` (every program has ended),
        end anything left in them first."""
        if self.cgroups is None:
            return
        for cgroup in list(self.cgroups.existing()) if end_strays else []:
            try:
                await emptied(cgroup)
            except OSError as exc:
                log.warning("cgroup_not_emptied", cgroup=str(cgroup.path), error=str(exc))
        self.cgroups.remove_empty()

    def attach(self, nursery: trio.Nursery) -> None:
        """Run the runners in this nursery from now on."""
        self._nursery = nursery

    def _count_restarts(self, runner: ProgramRunner, before: State, after: State) -> None:
        """A restart is a new instance the supervisor starts by itself: after an exit
        (RUNNING -> STARTING) or a failed start (BACKOFF -> STARTING)."""
        restarted = after == State.STARTING and before in (State.RUNNING, State.BACKOFF)
        if restarted and self.metrics is not None:
            self.metrics.program_restarted(runner.name)

    async def add(self, program: ProgramConfig) -> ProgramRunner:
        """A runner for this definition, running (its program not started yet)."""
        if self.metrics is not None:
            self.metrics.add_program(program.name)
        runner = ProgramRunner(program, self.context(), self.launcher)
        scope = trio.CancelScope()
        self.runners[program.name] = runner
        self._scopes[program.name] = scope
        self._change_roster()
        for listener in self.listeners:
            await listener.program_added(runner)
        await self.nursery.start(self._run_runner, runner, scope)
        return runner

    @staticmethod
    async def _run_runner(
        runner: ProgramRunner,
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await runner.run(task_status=task_status)

    def update(self, program: ProgramConfig) -> None:
        """Give a runner a definition whose process-affecting part is unchanged."""
        runner = self.runners[program.name]
        runner.update_config(program)
        for listener in self.listeners:
            listener.program_updated(runner)

    def forget(self, name: str, *, for_good: bool = False) -> None:
        """Drop a (stopped) program's runner; `for_good` when it leaves the configuration."""
        self.runners.pop(name).retire()
        self._change_roster()
        if for_good and self.metrics is not None:
            self.metrics.forget_program(name)
        self._scopes.pop(name).cancel()
        for listener in self.listeners:
            listener.program_forgotten(name)

    def _change_roster(self) -> None:
        self._roster_changed.set()
        self._roster_changed = trio.Event()

    async def remove(self, name: str) -> None:
        await self.stop_until_stopped([name])
        self.forget(name, for_good=True)

    def autostart(self, names: Iterable[str], launchers: Mapping[str, Launcher]) -> None:
        """At supervisor start: start (in the background) those of `names` that autostart,
        and those that have their own launcher (a program taken back after a crash),
        through it."""
        for name in names:
            launcher = launchers.get(name)
            if self.runners[name].config.autostart or launcher is not None:
                self.nursery.start_soon(
                    self.start_after_dependencies, name, launcher, "supervisor-start"
                )

    async def start_after_dependencies(
        self, name: str, launcher: Launcher | None = None, cause: StartCause = "start"
    ) -> State:
        """Start a program once its dependencies run; through `launcher` when given."""
        runner = self.runners[name]
        for dependency in runner.config.depends_on:
            with runner.waiting_for_dependencies():
                state = await self._wait_for_dependency(runner, dependency)
            if runner.retired:  # replaced meanwhile: the reload starts its successor
                return runner.state
            if state not in (None, State.RUNNING):
                runner.refuse_start(f"dependency {dependency} is {state}")
                log.error("dependency_failed", program=name, dependency=dependency)
                return runner.state
        return await runner.start(start_timeout_bound(runner.config), launcher, cause)

    async def _wait_for_dependency(self, runner: ProgramRunner, dependency: str) -> State | None:
        """The dependency's state once it is RUNNING or FATAL, following a reload that
        replaces its runner meanwhile; None when it is not configured."""
        while not runner.retired:
            dep = self.runners.get(dependency)
            if dep is None:
                if dependency not in self.config.programs:
                    return None
                await self._roster_changed.wait()  # a reload is about to add its new runner
                continue
            if dep.state != State.RUNNING:
                log.info("waiting_for_dependency", program=runner.name, dependency=dependency)
            state = await dep.wait_until(
                lambda s: s in (State.RUNNING, State.FATAL), DEPENDENCY_WAIT_SECONDS
            )
            if not dep.retired:
                return state
        return None

    def _follow_dependencies(self, runner: ProgramRunner, before: State, after: State) -> None:
        """A dependency that stops or crashes stops its dependents (on_dependency_stop =
        "stop" or "restart"); once it runs again, the "restart" ones start again."""
        if self.shutting_down or runner.dependents_unaffected or self._nursery is None:
            return
        name = runner.name
        if self.runners.get(name) is not runner:
            return  # a runner being replaced (reload): its successor speaks for it
        if before == State.RUNNING and after != State.RUNNING:
            for dependent_name in self.dependents(name):
                dependent = self.runners[dependent_name]
                policy = dependent.config.on_dependency_stop
                if policy == "ignore" or dependent.state not in ACTIVE_OR_RETRYING:
                    continue
                log.warning(
                    "dependency_stopped",
                    program=dependent_name,
                    dependency=name,
                    dependency_state=after.value,
                    on_dependency_stop=policy,
                )
                if policy == "restart":
                    self._stopped_for[dependent_name] = name
                self.nursery.start_soon(self._stop_for_dependency, dependent, name)
        elif after == State.RUNNING:
            for dependent_name, dependency in list(self._stopped_for.items()):
                if dependency != name:
                    continue
                del self._stopped_for[dependent_name]
                if dependent_name in self.runners:
                    log.info("dependency_running_again", program=dependent_name, dependency=name)
                    self.nursery.start_soon(
                        self.start_after_dependencies, dependent_name, None, "dependency"
                    )

    @staticmethod
    async def _stop_for_dependency(dependent: ProgramRunner, dependency: str) -> None:
        await dependent.stop(dependent.stop_timeout_bound())
        if dependent.state == State.STOPPED:
            dependent.machine.reason = f"stopped because {dependency} stopped"

    def dependents(self, name: str) -> list[str]:
        return [n for n, r in self.runners.items() if name in r.config.depends_on]

    async def stop_programs(self, names: list[str]) -> None:
        """Stop these programs concurrently, each only after the ones that depend on it."""
        selected = set(names)
        for name in selected:  # an operator's word replaces a pending restart
            self._stopped_for.pop(name, None)
        done = {name: trio.Event() for name in selected}

        async def stop_one(name: str) -> None:
            for dependent in self.dependents(name):
                if dependent in done:
                    await done[dependent].wait()
            runner = self.runners[name]
            await runner.stop(runner.stop_timeout_bound())
            done[name].set()

        async with trio.open_nursery() as nursery:
            for name in selected:
                nursery.start_soon(stop_one, name)

    async def stop_until_stopped(self, names: list[str]) -> None:
        """Stop these programs, and again those started meanwhile (a restore that was
        waiting for its stop): on return none runs, and a caller that forgets their runners
        before its next await leaves no instance running unwatched."""
        pending = names
        while pending:
            await self.stop_programs(pending)
            pending = [n for n in names if self.runners[n].state in ACTIVE_OR_RETRYING]

    async def start_programs(self, names: list[str]) -> None:
        """Start these programs and what they depend on, each after its dependencies."""
        for name in names:
            self._stopped_for.pop(name, None)
        async with trio.open_nursery() as nursery:
            for name in self._with_dependencies(names):
                nursery.start_soon(self.start_after_dependencies, name)

    def _with_dependencies(self, names: list[str]) -> list[str]:
        wanted: set[str] = set()
        pending = list(names)
        while pending:
            name = pending.pop()
            if name in wanted:
                continue
            wanted.add(name)
            pending.extend(d for d in self.runners[name].config.depends_on if d in self.runners)
        return [n for n in self.config.start_order() if n in wanted]

    def select(self, names: list[str]) -> list[str]:
        """The programs a request names ("all" = every one); ControlError for unknown names."""
        if not names:
            raise ControlError("name at least one program, or all", usage=True)
        if "all" in names:
            # The configuration's order, also after a reload replaced some runners.
            listed = [n for n in self.config.programs if n in self.runners]
            return listed + [n for n in self.runners if n not in listed]
        unknown = [n for n in names if n not in self.runners]
        if unknown:
            raise ControlError(f"no such program: {', '.join(unknown)}", usage=True)
        return list(dict.fromkeys(names))

    async def kill_leftovers(self) -> None:
        """After a crash or a cancellation: no program outlives the supervisor."""
        for runner in self.runners.values():
            process = runner.process
            if process is None or process.returncode is not None:
                continue
            log.warning("program_killed_on_exit", program=runner.name, pid=process.pid)
            process.send_signal(signal.SIGKILL)
            with trio.move_on_after(5.0):
                await process.wait()
