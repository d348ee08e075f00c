"""When programs are checkpointed and restored: signal rounds, intervals, requests, pruning.

CheckpointService (checkpoints.py) does one checkpoint or one restore; this module decides
when, for which programs, and how many at once.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any

import structlog
import trio

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.lifecycle.policies import CoalescingTrigger, run_interval
from grenadine_sv.store.images import ImageMeta, Trigger
from grenadine_sv.store.trust import UntrustedPath
from grenadine_sv.supervisor.checkpoints import CheckpointService
from grenadine_sv.supervisor.definitions import (
    OLD_FORMAT_WARNING,
    changed_definition_message,
    check_definition,
)
from grenadine_sv.supervisor.image_service import CheckpointError
from grenadine_sv.supervisor.programs import Programs, start_timeout_bound
from grenadine_sv.supervisor.remote_refs import REMOTE_PREFIX, RemoteUnavailable
from grenadine_sv.supervisor.runner import ProgramRunner

log = structlog.get_logger()

# CRIU is CPU-bound while it freezes and copies memory: dump about as many programs at
# once as there are cores, so one signal round neither serialises nor thrashes.
PARALLEL_CHECKPOINTS = max(os.cpu_count() or 1, 1)
# After the shutdown checkpoints' deadline, how often CRIUs still at work are killed.
KILL_POLL_SECONDS = 0.05


def what_runs(runner: ProgramRunner) -> str:
    """The program's state, and for a process what it was started from."""
    pid = runner.machine.pid
    if pid is None:
        return runner.state.value
    origin = runner.restored_from
    source = f"restored from image {origin.image_id[:12]}" if origin else "started from scratch"
    return f"{runner.state.value} pid {pid}, {source}"


def replaced(runner: ProgramRunner, instance: int | None) -> str | None:
    """Why the instance a restore started (None: none) is not the runner's; None if it is."""
    if instance is None:
        return "the program had not stopped for the restore"
    if instance != runner.machine.instance:
        return "another instance has replaced the restored one"
    return None


class Checkpointing:
    """The checkpoint policies (SIGUSR1 rounds, intervals) and the checkpoint, restore and
    prune requests, on top of one CheckpointService (None when no CRIU is usable)."""

    def __init__(self, programs: Programs, service: CheckpointService | None) -> None:
        self.programs = programs
        self.service = service
        self.signal_rounds = CoalescingTrigger(self._checkpoint_round)
        self._limiter = trio.CapacityLimiter(PARALLEL_CHECKPOINTS)
        self._interval_scopes: dict[str, trio.CancelScope] = {}
        # Programs whose newest image learn_last_checkpoints has just read, for program_added.
        self._learned: set[str] = set()
        # One per program: its restores wait their turn on it.
        self._restoring: collections.defaultdict[str, trio.Lock] = collections.defaultdict(
            trio.Lock
        )
        programs.listeners.append(self)

    def usable_service(self) -> CheckpointService:
        if self.service is None:
            raise ControlError(
                "checkpoints are unavailable: no usable CRIU (see grenadine-sv doctor)"
            )
        return self.service

    # what happens to programs ----------------------------------------------------

    async def learn_last_checkpoints(self, names: list[str]) -> None:
        """Before the programs are added at start: their newest images, read in one worker
        thread rather than one each (50 programs started ~50 ms later that way)."""
        service = self.service
        if service is None:
            return

        def learn_all() -> None:
            for name in names:
                service.learn_last_checkpoint(name)

        await trio.to_thread.run_sync(learn_all)
        self._learned.update(names)

    async def program_added(self, runner: ProgramRunner) -> None:
        if self.service is not None and runner.name not in self._learned:
            await trio.to_thread.run_sync(self.service.learn_last_checkpoint, runner.name)
        self._learned.discard(runner.name)  # added again later (a reload): read again
        self._start_interval_policy(runner)

    def program_updated(self, runner: ProgramRunner) -> None:
        self._start_interval_policy(runner)

    def program_forgotten(self, name: str) -> None:
        interval = self._interval_scopes.pop(name, None)
        if interval is not None:
            interval.cancel()

    def _start_interval_policy(self, runner: ProgramRunner) -> None:
        name = runner.name
        self.program_forgotten(name)
        if self.service is None or runner.config.checkpoint.interval is None:
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

        self.programs.nursery.start_soon(interval_task)

    # policies ------------------------------------------------------------------

    def on_checkpoint_signal(self) -> None:
        self.signal_rounds.request()

    async def _checkpoint_round(self) -> None:
        runners = self.programs.runners
        names = [n for n, r in runners.items() if r.config.checkpoint.on_signal]
        if not names:
            log.info("checkpoint_signal_ignored", reason="no program has on_signal = true")
            return
        if self.service is None:
            log.error("checkpoint_signal_ignored", reason="no usable CRIU")
            return
        log.info("checkpoint_round", programs=names)
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._checkpoint_quietly, runners[name], "signal")

    async def _checkpoint_quietly(self, runner: ProgramRunner, trigger: Trigger) -> None:
        """A policy-driven checkpoint: failures are logged and counted, never raised."""
        if runner.state != State.RUNNING:
            log.info("checkpoint_skipped", program=runner.name, trigger=trigger, state=runner.state)
            return
        async with self._limiter:
            with contextlib.suppress(CheckpointError, ControlError):
                await self.usable_service().checkpoint(runner, trigger)

    async def checkpoint_at_shutdown(self, timeout: float) -> list[str]:
        """Checkpoint, all at once, the programs with checkpoint.on_stop that are RUNNING (or
        become so within `timeout`, when STARTING), each frozen
        until its image is durable and then ended by the dump, so that the next supervisor
        restores them as they were. A program whose checkpoint fails, or is not done within
        `timeout` (its CRIU is then killed), runs on and is stopped normally afterwards.
        Returns the programs checkpointed."""
        runners = self.programs.runners
        on_stop = [n for n in self.programs.select(["all"]) if runners[n].config.checkpoint.on_stop]
        # A program still STARTING already holds what an image must keep (a restored one, all
        # its memory): wait for it to be ready, within the same bound, rather than stop it
        # unsaved and leave an older image to be restored next time.
        starting = [n for n in on_stop if runners[n].state == State.STARTING]
        began = trio.current_time()
        if starting:
            log.info("shutdown_checkpoints_waiting", programs=starting, timeout_seconds=timeout)
            with trio.move_on_after(timeout):
                for name in starting:
                    await runners[name].wait_until(lambda s: s != State.STARTING, timeout)
        timeout = max(0.0, timeout - (trio.current_time() - began))
        chosen = [n for n in on_stop if runners[n].state == State.RUNNING]
        if not chosen:
            return []
        if self.service is None:
            log.error("shutdown_checkpoints_skipped", programs=chosen, reason="no usable CRIU")
            return []
        service = self.service
        log.info("shutdown_checkpoints", programs=chosen, timeout_seconds=timeout)
        done: list[str] = []

        expired = False

        async def one(name: str) -> None:
            if expired:
                log.error("shutdown_checkpoint_skipped", program=name, reason="deadline passed")
                return
            try:
                image = await service.checkpoint(runners[name], "shutdown", stop=True)
            except CheckpointError as exc:
                log.error("shutdown_checkpoint_failed", program=name, error=str(exc))
                return
            done.append(name)
            log.info("shutdown_checkpoint_done", program=name, image_id=image.id)

        async def deadline() -> None:
            # Dumps are never cancelled half-way (a program must end up either dumped and
            # ended, or running): past the deadline, CRIU is killed, which fails the dump.
            nonlocal expired
            await trio.sleep(timeout)
            expired = True
            log.error("shutdown_checkpoint_timeout", timeout_seconds=timeout)
            while True:
                service.criu.kill_running()
                await trio.sleep(KILL_POLL_SECONDS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deadline)
            async with trio.open_nursery() as dumps:
                for name in chosen:
                    dumps.start_soon(one, name)
            nursery.cancel_scope.cancel()
        return [n for n in chosen if n in done]

    # requests ------------------------------------------------------------------

    async def checkpoint_programs(self, names: list[str], stop: bool) -> list[dict[str, Any]]:
        service = self.usable_service()
        results: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            async with self._limiter:
                try:
                    image = await service.checkpoint(
                        self.programs.runners[name], "manual", stop=stop
                    )
                except CheckpointError as exc:
                    results[name] = {"program": name, "ok": False, "error": str(exc)}
                    return
            results[name] = {"program": name, "ok": True, "image": image.model_dump(mode="json")}

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        ordered = [results[n] for n in names]
        # Nothing made is an error; some made is a reply that says which failed, and why.
        if not any(r["ok"] for r in ordered):
            raise ControlError("; ".join(f"{r['program']}: {r['error']}" for r in ordered))
        return ordered

    async def checkpoint_signal_round(self, stop: bool) -> list[dict[str, Any]]:
        """What SIGUSR1 does, as a request: checkpoint every RUNNING program with
        checkpoint.on_signal = true, and say which were skipped."""
        runners = self.programs.runners
        every = self.programs.select(["all"])
        chosen = [n for n in every if runners[n].config.checkpoint.on_signal]
        if not chosen:
            raise ControlError("no program has checkpoint.on_signal = true", usage=True)
        running = [n for n in chosen if runners[n].state == State.RUNNING]
        done = {r["program"]: r for r in await self.checkpoint_programs(running, stop)}
        return [
            done.get(n)
            or {"program": n, "ok": True, "skipped": f"{runners[n].state.value}, not RUNNING"}
            for n in chosen
        ]

    async def restore_program(
        self, name: str, ref: str, force: bool = False, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]:
        """Restore a program from an image; the reply says which, and any fallback taken.
        Restores of one program run one at a time, in the order asked. An image taken under
        another definition is refused before the running instance is touched, unless
        `allow_changed_definition`. A RUNNING program is checkpointed first, so that its live
        memory is not lost; if that fails, nothing happens unless `force`. A stop or a reload
        asked meanwhile wins: the reply is then a ControlError saying what runs."""
        service = self.usable_service()
        runner = self.programs.runners[self.programs.select([name])[0]]
        stops = runner.stops_asked
        image = await self._resolve(service, runner, ref, allow_changed_definition)
        with service.using(image):  # while it waits its turn too, a prune leaves it alone
            async with self._restoring[runner.name]:
                return await self._restore(
                    service,
                    runner,
                    stops,
                    image,
                    force=force,
                    allow_changed_definition=allow_changed_definition,
                )

    async def _resolve(
        self,
        service: CheckpointService,
        runner: ProgramRunner,
        ref: str,
        allow_changed_definition: bool,
    ) -> ImageMeta:
        try:
            await trio.to_thread.run_sync(service.store.check_trusted)
            if ref.startswith(REMOTE_PREFIX):
                return await service.resolve_for_start(
                    runner.config, ref, allow_changed_definition=allow_changed_definition
                )
            return await trio.to_thread.run_sync(service.store.resolve, runner.name, ref)
        except (UntrustedPath, RemoteUnavailable) as exc:
            raise ControlError(str(exc)) from exc
        except (LookupError, ValueError) as exc:
            raise ControlError(str(exc), usage=True) from exc

    async def _restore(
        self,
        service: CheckpointService,
        runner: ProgramRunner,
        stops: int,
        image: ImageMeta,
        *,
        force: bool,
        allow_changed_definition: bool,
    ) -> dict[str, Any]:
        """One restore, its turn come; `stops` is the runner's stops_asked when it was asked."""
        name = runner.name
        self._refuse_if_overtaken(runner, stops, image)
        check = check_definition(runner.config, image)
        if not check.unchanged and not allow_changed_definition:
            raise ControlError(changed_definition_message(image, check))
        restored: dict[str, Any] = {"image": image.id, "fallback": None, "saved": None}
        if runner.state == State.RUNNING and not force:
            try:
                with service.using(image):  # the retention after it must not take `image`
                    saved = await service.checkpoint(runner, "pre-restore")
            except CheckpointError as exc:
                raise ControlError(
                    f"{name} is RUNNING and its memory could not be saved first ({exc}); "
                    "nothing was restored (--force restores anyway, losing it)"
                ) from exc
            restored["saved"] = saved.id
        if not check.recorded_fields:
            restored["warning"] = OLD_FORMAT_WARNING
        elif not check.unchanged:
            restored["warning"] = f"restored into a changed definition: {check.describe()}"

        def note_fallback(reason: str, instead: ImageMeta | None) -> None:
            restored["fallback"] = reason
            restored["restored_from"] = instead.id if instead is not None else None

        # From here until it runs, a prune leaves the image alone (stopping the old instance
        # may take its stopwaitsecs); a restore never stops the program's dependents.
        with service.using(image), runner.leaving_dependents_alone():
            if runner.state in (State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING):
                await runner.stop(runner.stop_timeout_bound(), replacing=True)
            self._refuse_if_overtaken(runner, stops, image)
            instance = runner.request_start(
                lambda r: service.launch_with_fallback(
                    r,
                    image,
                    note_fallback,
                    occasion="restore",
                    allow_changed_definition=allow_changed_definition,
                )
            )
            await runner.settled(start_timeout_bound(runner.config))
        self._refuse_if_overtaken(runner, stops, image, replaced(runner, instance))
        return restored

    def _refuse_if_overtaken(
        self, runner: ProgramRunner, stops: int, image: ImageMeta, why: str | None = None
    ) -> None:
        """ControlError when the restore has been overtaken (its reply would claim `image`
        where something else runs): its runner replaced by a reload, a stop asked since
        `stops`, or `why`."""
        current = self.programs.runners.get(runner.name)
        if current is not runner:
            why = "it was reloaded or removed during the restore"
        elif runner.stops_asked != stops:
            why = "a stop or a reload of it was asked during the restore"
        if why is None:
            return
        now = f"{runner.name} is {what_runs(current)}" if current else "it is no longer configured"
        raise ControlError(f"image {image.id[:12]} is not what runs: {why}; {now}")

    async def prune(
        self, names: list[str], keep: int | None, force: bool = False
    ) -> dict[str, list[str]]:
        """Apply retention (each program's checkpoint.keep, or `keep`). Programs no longer
        configured are reached by name (their images are kept until asked: keep 0 unless
        given). An image a pinned `restore` names is kept unless `force`."""
        service = self.usable_service()
        known = await trio.to_thread.run_sync(service.store.programs)
        runners = self.programs.runners
        unknown = [n for n in names if n not in runners and n not in known]
        if unknown:
            raise ControlError(f"no such program: {', '.join(unknown)}", usage=True)
        deleted: dict[str, list[str]] = {}
        for name in names or self.programs.select(["all"]):
            runner = runners.get(name)
            limit = keep if keep is not None else runner.config.checkpoint.keep if runner else 0
            async with service.images_of(name).lock:
                listed = await trio.to_thread.run_sync(service.store.list, name)
                doomed = service.store.prune_plan(listed, limit)
                if not force:
                    self._refuse_pinned(name, doomed, "prune")
                gone = await trio.to_thread.run_sync(service.prune_images, name, limit)
            deleted[name] = [image.id for image in gone]
        return deleted

    async def remove_images(
        self, name: str, refs: list[str], force: bool = False
    ) -> dict[str, list[str]]:
        """Delete the images `refs` name (corrupt ones included); one a pinned `restore`
        names only with `force`."""
        service = self.usable_service()
        known = await trio.to_thread.run_sync(service.store.programs)
        if name not in self.programs.runners and name not in known:
            raise ControlError(f"no such program: {name}", usage=True)
        async with service.images_of(name).lock:
            images: list[ImageMeta] = []
            for ref in refs:
                try:
                    image = await trio.to_thread.run_sync(service.store.resolve, name, ref)
                except UntrustedPath as exc:
                    raise ControlError(str(exc)) from exc
                except (LookupError, ValueError) as exc:
                    raise ControlError(str(exc), usage=True) from exc
                if image not in images:
                    images.append(image)
            if not force:
                self._refuse_pinned(name, images, "rmi")
            for image in images:
                await trio.to_thread.run_sync(service.remove_image, image)
                log.info("image_removed", program=name, image_id=image.id)
        return {name: [image.id for image in images]}

    def _refuse_pinned(self, name: str, doomed: list[ImageMeta], command: str) -> None:
        """Refuse to delete the image a pinned `restore` of `name` would start from."""
        runner = self.programs.runners.get(name)
        ref = runner.config.restore if runner is not None else None
        if ref is None or self.service is None or not doomed:
            return
        try:
            pinned = self.service.store.resolve(name, ref)
        except (LookupError, ValueError):
            return
        if pinned in doomed:
            raise ControlError(
                f"{command} would delete image {pinned.id[:12]}, which programs.{name}.restore "
                f'= "{ref}" starts {name} from; nothing deleted (--force deletes it anyway)'
            )
