"""When programs are checkpointed and restored: signal rounds, intervals, requests, pruning.

CheckpointService (checkpoints.py) does one checkpoint or one restore; this module decides
when, for which programs, and how many at once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import structlog
import trio

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.lifecycle.policies import CoalescingTrigger, run_interval
from grenadine_sv.store.images import Trigger
from grenadine_sv.store.trust import UntrustedPath
from grenadine_sv.supervisor.checkpoints import (
    OLD_FORMAT_WARNING,
    CheckpointError,
    CheckpointService,
    changed_definition_message,
    check_definition,
)
from grenadine_sv.supervisor.programs import Programs, start_timeout_bound
from grenadine_sv.supervisor.remote import REMOTE_PREFIX, RemoteUnavailable
from grenadine_sv.supervisor.runner import ProgramRunner

log = structlog.get_logger()

# CRIU is CPU-bound while it freezes and copies memory: dump about as many programs at
# once as there are cores, so one signal round neither serialises nor thrashes.
PARALLEL_CHECKPOINTS = max(os.cpu_count() or 1, 1)


class Checkpointing:
    """The checkpoint policies (SIGUSR1 rounds, intervals) and the checkpoint, restore and
    prune requests, on top of one CheckpointService (None when no CRIU is usable)."""

    def __init__(self, programs: Programs, service: CheckpointService | None) -> None:
        self.programs = programs
        self.service = service
        self.signal_rounds = CoalescingTrigger(self._checkpoint_round)
        self._limiter = trio.CapacityLimiter(PARALLEL_CHECKPOINTS)
        self._interval_scopes: dict[str, trio.CancelScope] = {}
        programs.listeners.append(self)

    def usable_service(self) -> CheckpointService:
        if self.service is None:
            raise ControlError(
                "checkpoints are unavailable: no usable CRIU (see grenadine-sv doctor)"
            )
        return self.service

    # what happens to programs ----------------------------------------------------

    async def program_added(self, runner: ProgramRunner) -> None:
        if self.service is not None:
            await trio.to_thread.run_sync(self.service.learn_last_checkpoint, runner.name)
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
        failed = [r for r in ordered if not r["ok"]]
        if failed:
            raise ControlError("; ".join(f"{r['program']}: {r['error']}" for r in failed))
        return ordered

    async def restore_program(
        self, name: str, ref: str, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]:
        """Restore a program from an image; the reply says which, and any fallback taken.
        An image taken under another definition is refused before the running instance is
        touched, unless `allow_changed_definition`."""
        service = self.usable_service()
        runner = self.programs.runners[self.programs.select([name])[0]]
        try:
            await trio.to_thread.run_sync(service.store.check_trusted)
            if ref.startswith(REMOTE_PREFIX):
                image = await service.resolve_for_start(
                    runner.config, ref, allow_changed_definition=allow_changed_definition
                )
            else:
                image = await trio.to_thread.run_sync(service.store.resolve, name, ref)
        except (LookupError, ValueError, UntrustedPath, RemoteUnavailable) as exc:
            raise ControlError(str(exc)) from exc
        check = check_definition(runner.config, image)
        if not check.unchanged and not allow_changed_definition:
            raise ControlError(changed_definition_message(image, check))
        restored: dict[str, Any] = {"image": image.id, "fallback": None}
        if not check.recorded_fields:
            restored["warning"] = OLD_FORMAT_WARNING
        elif not check.unchanged:
            restored["warning"] = f"restored into a changed definition: {check.describe()}"

        def note_fallback(reason: str) -> None:
            restored["fallback"] = reason

        # From here until it runs, a prune leaves the image alone (stopping the old instance
        # may take its stopwaitsecs).
        with service.using(image):
            if runner.state in (State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING):
                await runner.stop(runner.stop_timeout_bound())
            await runner.start(
                start_timeout_bound(runner.config),
                lambda r: service.launch_with_fallback(
                    r, image, note_fallback, allow_changed_definition=allow_changed_definition
                ),
            )
        return restored

    async def prune(self, names: list[str], keep: int | None) -> dict[str, list[str]]:
        service = self.usable_service()
        runners = self.programs.runners
        deleted: dict[str, list[str]] = {}
        for name in names or list(runners):
            limit = keep if keep is not None else runners[name].config.checkpoint.keep
            async with service.images_of(name).lock:
                gone = await trio.to_thread.run_sync(service.prune_images, name, limit)
            deleted[name] = [image.id for image in gone]
        return deleted
