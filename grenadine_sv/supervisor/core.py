"""The supervisor: one trio nursery, a task per program, signals, control requests, reload."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import stat
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from grenadine_sv import __version__
from grenadine_sv.config.loading import Config, ConfigError, ProgramConfig, load_config
from grenadine_sv.control import server as control
from grenadine_sv.control.handler import RequestHandler, describe
from grenadine_sv.control.server import ControlError
from grenadine_sv.criu.binary import CriuNotFound, CriuVersionUnknown, criu_version, find_criu
from grenadine_sv.criu.client import Criu
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.lifecycle.policies import CoalescingTrigger, run_interval
from grenadine_sv.lifecycle.reload import ProgramDiff, diff_programs
from grenadine_sv.metrics.collector import Metrics, MetricsListenError, serve_metrics
from grenadine_sv.sandbox import become_subreaper
from grenadine_sv.store.images import ImageMeta, ImageStore, Trigger
from grenadine_sv.supervisor.checkpoints import CheckpointError, CheckpointService
from grenadine_sv.supervisor.recovery import (
    RecordedInstance,
    StateDirBusy,
    state_dir_lock,
    stop_orphan,
    surviving_instances,
    write_state,
)
from grenadine_sv.supervisor.runner import Launcher, ProgramRunner, RunnerContext, StateObserver

log = structlog.get_logger()

DEPENDENCY_WAIT_SECONDS = math.inf
# CRIU is CPU-bound while it freezes and copies memory: dump about as many programs at
# once as there are cores, so one signal round neither serialises nor thrashes.
PARALLEL_CHECKPOINTS = max(os.cpu_count() or 1, 1)


PID_FILE = "grenadine-sv.pid"


def write_pid_file(path: Path) -> None:
    """The supervisor's pid, for `kill -USR1 $(cat ...)`; `grenadine-sv pid` asks the socket."""
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


def find_usable_criu(config: Config) -> tuple[Path, str] | None:
    """The CRIU binary and its version, or None (with a warning) when none is usable."""
    try:
        binary = find_criu(config.supervisor.criu)
        version = ".".join(str(part) for part in criu_version(binary))
    except (CriuNotFound, CriuVersionUnknown) as exc:
        log.warning("checkpoints_unavailable", reason=str(exc))
        return None
    return binary, version


def build_supervisor(config: Config) -> Supervisor:
    """A supervisor with everything the configuration asks for: checkpoints, metrics."""
    criu = find_usable_criu(config)
    state_dir = config.supervisor.state_dir
    store = ImageStore(state_dir)
    metrics: Metrics | None = None
    supervisor: Supervisor
    if config.supervisor.metrics.address() is not None:
        metrics = Metrics(
            store=store,
            programs=lambda: dict(supervisor.runners),
            criu_version=criu[1] if criu is not None else "none",
            version=__version__,
        )
    checkpoints = None
    if criu is not None:
        binary, version = criu
        checkpoints = CheckpointService(
            store, Criu(binary), version, state_dir / "restore-logs", metrics
        )
    supervisor = Supervisor(config, checkpoints=checkpoints, metrics=metrics)
    return supervisor


def prepare_state_dir(path: Path) -> None:
    """Create state_dir 0700, or refuse one that other users can write."""
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


class Supervisor:
    def __init__(
        self,
        config: Config,
        observers: Iterable[StateObserver] = (),
        checkpoints: CheckpointService | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.runners: dict[str, ProgramRunner] = {}
        self.checkpoints = checkpoints
        self.metrics = metrics
        self._observers = (*tuple(observers), self._record_instances, self._count_restarts)
        self._recorded: dict[str, RecordedInstance] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._interval_scopes: dict[str, trio.CancelScope] = {}
        self._programs: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self._reload_lock = trio.Lock()
        self._checkpoint_limiter = trio.CapacityLimiter(PARALLEL_CHECKPOINTS)
        self.signal_rounds = CoalescingTrigger(self._checkpoint_round)
        self.rollbacks: dict[str, str] = {}
        self.started = trio.Event()

    @property
    def state_dir(self) -> Path:
        return self.config.supervisor.state_dir

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def root_anchor(self) -> Path:
        return self.state_dir / "sandbox-root"

    def context(self) -> RunnerContext:
        return RunnerContext(
            log_dir=self.config.supervisor.log_dir,
            root_anchor=self.root_anchor,
            observers=self._observers,
        )

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        prepare_state_dir(self.state_dir)
        try:
            with state_dir_lock(self.state_dir):
                await self._run_locked(task_status)
        except StateDirBusy as exc:
            raise StartupError(str(exc)) from exc

    async def _run_locked(self, task_status: trio.TaskStatus[None]) -> None:
        settings = self.config.supervisor
        self.root_anchor.mkdir(mode=0o700, exist_ok=True)
        settings.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        become_subreaper()
        if self.checkpoints is not None:
            stale = await trio.to_thread.run_sync(self.checkpoints.store.remove_stale_partials)
            if stale:
                log.warning("stale_partial_images_removed", count=stale)
        sock = control.bind_socket(settings.control_socket)
        write_pid_file(self.pid_file)
        log.info(
            "supervisor_started",
            pid=os.getpid(),
            config=str(self.config.path),
            programs=len(self.config.programs),
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, sock, RequestHandler(self).handle)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self.signal_rounds.run)
                if self.metrics is not None:
                    await self._serve_metrics(nursery, self.metrics)
                async with trio.open_nursery() as programs:
                    self._programs = programs
                    recovered = await self._take_back_orphans()
                    for name in self.config.start_order():
                        runner = await self._add(self.config.programs[name])
                        launcher = recovered.get(name)
                        if launcher is not None:
                            runner.next_launcher = launcher
                    self._autostart(self.config.start_order(), also=set(recovered))
                    self.started.set()
                    task_status.started()
                    await self._shutdown.wait()
                    log.info("supervisor_stopping")
                    await self.stop_programs(list(self.runners))
                    programs.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._kill_leftovers()
            sock.close()
            if settings.control_socket.is_socket():
                settings.control_socket.unlink()
            self.pid_file.unlink(missing_ok=True)
            log.info("supervisor_stopped")

    async def _kill_leftovers(self) -> None:
        """After a crash or a cancellation: no program outlives the supervisor."""
        for runner in self.runners.values():
            process = runner.process
            if process is None or process.returncode is not None:
                continue
            log.warning("program_killed_on_exit", program=runner.name, pid=process.pid)
            process.send_signal(signal.SIGKILL)
            with trio.move_on_after(5.0):
                await process.wait()

    # programs ----------------------------------------------------------------

    async def _serve_metrics(self, nursery: trio.Nursery, metrics: Metrics) -> None:
        address = self.config.supervisor.metrics.address()
        if address is None:
            return
        host, port = address
        for name in self.config.programs:
            metrics.add_program(name)
        try:
            bound = await nursery.start(serve_metrics, metrics, host, port)
        except MetricsListenError as exc:
            message = f"{self.config.path}: supervisor.metrics.listen: {exc}"
            raise StartupError(message, configuration=True) from exc
        log.info("metrics_listening", address=f"{bound[0]}:{bound[1]}")

    def _count_restarts(self, runner: ProgramRunner, before: State, after: State) -> None:
        """A restart is a new instance the supervisor starts by itself: after an exit
        (RUNNING -> STARTING) or a failed start (BACKOFF -> STARTING)."""
        restarted = after == State.STARTING and before in (State.RUNNING, State.BACKOFF)
        if restarted and self.metrics is not None:
            self.metrics.program_restarted(runner.name)

    async def _add(self, program: ProgramConfig) -> ProgramRunner:
        assert self._programs is not None
        if self.metrics is not None:
            self.metrics.add_program(program.name)
        runner = ProgramRunner(program, self.context())
        if self.checkpoints is not None:
            runner.launcher = self.checkpoints.launch_pinned
            await trio.to_thread.run_sync(self.checkpoints.learn_last_checkpoint, program.name)
        scope = trio.CancelScope()
        self.runners[program.name] = runner
        self._scopes[program.name] = scope
        await self._programs.start(self._run_runner, runner, scope)
        self._start_interval_policy(runner)
        return runner

    @staticmethod
    async def _run_runner(
        runner: ProgramRunner,
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await runner.run(task_status=task_status)

    def _start_interval_policy(self, runner: ProgramRunner) -> None:
        assert self._programs is not None
        name = runner.name
        previous = self._interval_scopes.pop(name, None)
        if previous is not None:
            previous.cancel()
        if self.checkpoints is None or runner.config.checkpoint.interval is None:
            return
        scope = trio.CancelScope()
        self._interval_scopes[name] = scope

        async def interval_task() -> None:
            with scope:
                await run_interval(
                    name,
                    lambda: runner.config.checkpoint.interval,
                    lambda: runner.state == State.RUNNING,
                    lambda: self._checkpoint_quietly(runner, "interval"),
                )

        self._programs.start_soon(interval_task)

    def _forget(self, name: str, *, for_good: bool = False) -> None:
        self.runners.pop(name)
        if for_good and self.metrics is not None:
            self.metrics.forget_program(name)
        self._scopes.pop(name).cancel()
        interval = self._interval_scopes.pop(name, None)
        if interval is not None:
            interval.cancel()

    async def _remove(self, name: str) -> None:
        runner = self.runners[name]
        await runner.stop(runner.stop_timeout_bound())
        self._forget(name, for_good=True)

    def _autostart(self, names: Iterable[str], also: set[str] | None = None) -> None:
        assert self._programs is not None
        for name in names:
            if self.runners[name].config.autostart or name in (also or set()):
                self._programs.start_soon(self._start_after_dependencies, name)

    # a previous supervisor's programs -------------------------------------------

    def _record_instances(self, runner: ProgramRunner, before: State, after: State) -> None:
        """Keep state_dir/supervisor.json listing every live instance (see recovery.py)."""
        process = runner.process
        name = runner.name
        alive = process is not None and process.returncode is None and runner.machine.pid
        if alive and process is not None:
            entry = RecordedInstance(
                pid=process.pid,
                start_time=process.start_time,
                pid_ns_inode=process.pid_ns_inode,
                definition_digest=runner.config.definition_digest(),
            )
            if self._recorded.get(name) == entry:
                return
            self._recorded[name] = entry
        elif self._recorded.pop(name, None) is None:
            return
        try:
            write_state(self.state_dir, self._recorded)
        except OSError as exc:
            log.error("state_file_write_failed", error=str(exc))

    async def _take_back_orphans(self) -> dict[str, Launcher]:
        """Sandboxes a killed supervisor left running: checkpoint each and restore it as our
        child (its memory kept, its output captured again); stop the others cleanly."""
        launchers: dict[str, Launcher] = {}
        orphans = await trio.to_thread.run_sync(surviving_instances, self.state_dir)
        for name, instance in orphans.items():
            program = self.config.programs.get(name)
            bound = log.bind(program=name, pid=instance.pid)
            if (
                program is not None
                and self.checkpoints is not None
                and program.definition_digest() == instance.definition_digest
            ):
                try:
                    image = await self.checkpoints.recover_orphan(program, instance.pid)
                except CheckpointError as exc:
                    bound.warning("orphan_not_recovered", error=str(exc))
                else:
                    bound.info("orphan_checkpointed", image_id=image.id)
                    service = self.checkpoints
                    launchers[name] = partial(service.launch_with_fallback, image=image)
                    continue
            stop_signal = program.stop_signal if program is not None else signal.SIGTERM
            stop_wait = program.stopwaitsecs if program is not None else 10.0
            bound.warning("orphan_stopping")
            await stop_orphan(name, instance, stop_signal, stop_wait)
        return launchers

    async def _start_after_dependencies(self, name: str) -> State:
        runner = self.runners[name]
        for dependency in runner.config.depends_on:
            dep = self.runners.get(dependency)
            if dep is None:
                continue
            if dep.state != State.RUNNING:
                log.info("waiting_for_dependency", program=name, dependency=dependency)
                state = await dep.wait_until(
                    lambda s: s in (State.RUNNING, State.FATAL), DEPENDENCY_WAIT_SECONDS
                )
                if state != State.RUNNING:
                    runner.machine.reason = f"dependency {dependency} is {state.value}"
                    log.error("dependency_failed", program=name, dependency=dependency)
                    return runner.state
        return await runner.start(self.start_timeout_bound(runner.config))

    @staticmethod
    def start_timeout_bound(program: ProgramConfig) -> float:
        probe = program.ready.timeout if program.ready is not None else program.startsecs
        return (probe + program.stopwaitsecs + 65.0) * (program.startretries + 1)

    def dependents(self, name: str) -> list[str]:
        return [n for n, r in self.runners.items() if name in r.config.depends_on]

    async def stop_programs(self, names: list[str]) -> None:
        """Stop these programs concurrently, each only after the ones that depend on it."""
        selected = set(names)
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

    async def start_programs(self, names: list[str]) -> None:
        async with trio.open_nursery() as nursery:
            for name in self._with_dependencies(names):
                nursery.start_soon(self._start_after_dependencies, name)

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

    # reload ------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        async with self._reload_lock:
            try:
                new_config = await trio.to_thread.run_sync(load_config, self.config.path)
            except ConfigError as exc:
                log.error("reload_failed", error=str(exc))
                raise ControlError(
                    f"configuration not reloaded, nothing changed:\n{exc}", usage=True
                ) from exc
            diff = diff_programs(self.config.programs, new_config.programs)
            log.info("reload", **diff.summary())
            if new_config.supervisor != self.config.supervisor:
                log.warning("supervisor_settings_need_restart")
            await self.stop_programs([n for n in diff.removed if n in self.runners])
            for name in diff.removed:
                await self._remove(name)
            safety_images = await self._pre_deploy_checkpoints(diff)
            stopped_by_hand = {n for n in diff.changed if self.runners[n].state == State.STOPPED}
            await self.stop_programs(list(diff.changed))
            old_programs = self.config.programs
            for name in diff.changed:
                self._forget(name)
            self.config = new_config
            for name in diff.updated:
                self.runners[name].update_config(new_config.programs[name])
                self._start_interval_policy(self.runners[name])
            for name in new_config.start_order():
                if name in diff.added or name in diff.changed:
                    self.rollbacks.pop(name, None)
                    await self._add(new_config.programs[name])
            deployed = [
                n
                for n in new_config.start_order()
                if n in diff.added or (n in diff.changed and n not in stopped_by_hand)
            ]
            summary: dict[str, Any] = dict(diff.summary())
            summary["pre_deploy_images"] = {n: img.id for n, img in safety_images.items()}
            summary["left_stopped"] = sorted(stopped_by_hand)
            summary["rolled_back"] = await self._deploy(deployed, safety_images, old_programs)
            summary["failed"] = {
                n: self._failure_of(n)
                for n in deployed
                if n not in summary["rolled_back"]
                and self.runners[n].config.autostart
                and self.runners[n].state != State.RUNNING
            }
            if summary["failed"]:
                log.error("reload_programs_failed", programs=summary["failed"])
            return summary

    def _failure_of(self, name: str) -> str:
        runner = self.runners[name]
        reason = runner.machine.reason
        return f"{runner.state.value}: {reason}" if reason else runner.state.value

    async def _pre_deploy_checkpoints(self, diff: ProgramDiff) -> dict[str, ImageMeta]:
        """Checkpoint each running program that is about to be replaced, when it opts in."""
        images: dict[str, ImageMeta] = {}
        if self.checkpoints is None:
            return images
        for name in diff.changed:
            runner = self.runners[name]
            if not runner.config.checkpoint.pre_deploy or runner.state != State.RUNNING:
                continue
            try:
                images[name] = await self.checkpoints.checkpoint(runner, "pre-deploy")
            except CheckpointError as exc:
                log.error("pre_deploy_checkpoint_failed", program=name, error=str(exc))
        return images

    async def _deploy(
        self,
        names: list[str],
        safety_images: dict[str, ImageMeta],
        old_programs: dict[str, ProgramConfig],
    ) -> list[str]:
        """Start the new instances; roll back those that never get ready, when asked to."""
        rolled_back: list[str] = []

        async def deploy_one(name: str) -> None:
            state = await self._start_after_dependencies(name)
            image = safety_images.get(name)
            old = old_programs.get(name)
            if state == State.RUNNING or image is None or old is None:
                return
            if not old.checkpoint.rollback or self.checkpoints is None:
                return
            reason = self.runners[name].machine.reason or f"new instance is {state.value}"
            await self._roll_back(name, old, image, reason)
            rolled_back.append(name)

        if not names:
            return rolled_back
        async with trio.open_nursery() as nursery:
            for name in names:
                if self.runners[name].config.autostart:
                    nursery.start_soon(deploy_one, name)
        return rolled_back

    async def _roll_back(
        self, name: str, old: ProgramConfig, image: ImageMeta, reason: str
    ) -> None:
        assert self.checkpoints is not None
        log.warning("deploy_rolled_back", program=name, image_id=image.id, reason=reason)
        failed = self.runners[name]
        await failed.stop(failed.stop_timeout_bound())
        self._forget(name)
        self.config.programs[name] = old
        runner = await self._add(old)
        service = self.checkpoints
        runner.next_launcher = lambda r: service.launch_with_fallback(r, image)
        self.rollbacks[name] = f"rolled back to {image.id[:12]}: {reason}"
        await runner.start(self.start_timeout_bound(old))

    # signals -----------------------------------------------------------------

    async def _watch_signals(self) -> None:
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with trio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal_shutdown", signal=signal.Signals(signum).name)
                    self.request_shutdown()
                elif signum == signal.SIGHUP:
                    assert self._programs is not None
                    self._programs.start_soon(self._reload_logging_errors)
                elif signum == signal.SIGUSR1:
                    self.on_checkpoint_signal()

    def on_checkpoint_signal(self) -> None:
        self.signal_rounds.request()

    # checkpoints ---------------------------------------------------------------

    def _service(self) -> CheckpointService:
        if self.checkpoints is None:
            raise ControlError(
                "checkpoints are unavailable: no usable CRIU (see grenadine-sv doctor)"
            )
        return self.checkpoints

    async def _checkpoint_round(self) -> None:
        names = [n for n, r in self.runners.items() if r.config.checkpoint.on_signal]
        if not names:
            log.info("checkpoint_signal_ignored", reason="no program has on_signal = true")
            return
        if self.checkpoints is None:
            log.error("checkpoint_signal_ignored", reason="no usable CRIU")
            return
        log.info("checkpoint_round", programs=names)
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._checkpoint_quietly, self.runners[name], "signal")

    async def _checkpoint_quietly(self, runner: ProgramRunner, trigger: Trigger) -> None:
        """A policy-driven checkpoint: failures are logged and counted, never raised."""
        if runner.state != State.RUNNING:
            log.info("checkpoint_skipped", program=runner.name, trigger=trigger, state=runner.state)
            return
        async with self._checkpoint_limiter:
            with contextlib.suppress(CheckpointError, ControlError):
                await self._service().checkpoint(runner, trigger)

    async def checkpoint_programs(self, names: list[str], stop: bool) -> list[dict[str, Any]]:
        service = self._service()
        results: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            async with self._checkpoint_limiter:
                try:
                    image = await service.checkpoint(self.runners[name], "manual", stop=stop)
                except CheckpointError as exc:
                    results[name] = {"program": name, "ok": False, "error": str(exc)}
                    return
            results[name] = {"program": name, "ok": True, "image": image.model_dump(mode="json")}

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        ordered = [results[n] for n in names]
        failed = [r for r in ordered if not r["ok"]]
        if failed:
            raise ControlError("; ".join(f"{r['program']}: {r['error']}" for r in failed))
        return ordered

    async def checkpoint_signal_round(self, stop: bool) -> list[dict[str, Any]]:
        """What SIGUSR1 does, as a command: checkpoint every RUNNING program with
        checkpoint.on_signal = true, and say which were skipped."""
        chosen = [n for n in self.select(["all"]) if self.runners[n].config.checkpoint.on_signal]
        if not chosen:
            raise ControlError("no program has checkpoint.on_signal = true", usage=True)
        running = [n for n in chosen if self.runners[n].state == State.RUNNING]
        done = {r["program"]: r for r in await self.checkpoint_programs(running, stop)}
        return [
            done.get(n)
            or {"program": n, "ok": True, "skipped": f"{self.runners[n].state.value}, not RUNNING"}
            for n in chosen
        ]

    async def restore_program(self, name: str, ref: str) -> dict[str, Any]:
        service = self._service()
        runner = self.runners[self.select([name])[0]]
        try:
            image = await trio.to_thread.run_sync(service.store.resolve, name, ref)
        except (LookupError, ValueError) as exc:
            raise ControlError(str(exc), usage=True) from exc
        if runner.state in (State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING):
            await runner.stop(runner.stop_timeout_bound())
        restored: dict[str, Any] = {"image": image.id, "fallback": None}

        def note_fallback(reason: str) -> None:
            restored["fallback"] = reason

        runner.next_launcher = lambda r: service.launch_with_fallback(r, image, note_fallback)
        await runner.start(self.start_timeout_bound(runner.config))
        return restored | describe(self, runner)

    async def prune(self, names: list[str], keep: int | None) -> dict[str, list[str]]:
        service = self._service()
        deleted: dict[str, list[str]] = {}
        for name in names or list(self.runners):
            limit = keep if keep is not None else self.runners[name].config.checkpoint.keep
            async with service.images_of(name).lock:
                gone = await trio.to_thread.run_sync(service.prune_images, name, limit)
            deleted[name] = [image.id for image in gone]
        return deleted

    async def _reload_logging_errors(self) -> None:
        with contextlib.suppress(ControlError):  # reload() has logged why
            await self.reload()

    # control -----------------------------------------------------------------

    def select(self, names: list[str]) -> list[str]:
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
