"""Deploys: a reload applies a new configuration's programs, with pre-deploy checkpoints
and a rollback to them for a new instance that never gets ready."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
import trio
from pydantic import ValidationError

from grenadine_sv.config.loading import (
    Config,
    ConfigError,
    ProgramConfig,
    SupervisorSettings,
    load_config,
)
from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.lifecycle.reload import ProgramDiff, changed_settings, diff_programs
from grenadine_sv.store.images import ImageMeta
from grenadine_sv.supervisor.checkpoints import CheckpointService
from grenadine_sv.supervisor.image_service import CheckpointError
from grenadine_sv.supervisor.programs import Programs, start_timeout_bound

log = structlog.get_logger()


def with_running_settings(config: Config, running: SupervisorSettings) -> Config:
    """The new configuration's programs under the running [supervisor] settings (its
    include globs aside, which chose the programs): a reload does not move state_dir,
    the control socket or the log directory under running programs."""
    settings = running.model_copy(update={"include": config.supervisor.include})
    try:
        return Config(
            path=config.path, files=config.files, supervisor=settings, programs=config.programs
        )
    except ValidationError as exc:
        raise ControlError(f"configuration not reloaded, nothing changed:\n{exc}") from exc


class Deploys:
    """Reloads, one at a time: removed programs stop, changed ones are checkpointed when they
    opt in, replaced, and rolled back to that image when the new instance fails."""

    def __init__(self, programs: Programs, checkpoints: CheckpointService | None) -> None:
        self.programs = programs
        self.checkpoints = checkpoints
        # Why a program runs its previous definition, for `status` until the next deploy.
        self.rollbacks: dict[str, str] = {}
        self._lock = trio.Lock()

    async def read_configuration(self) -> Config:
        """The configuration file as it is now (ControlError, usage, if it is invalid)."""
        try:
            return await trio.to_thread.run_sync(load_config, self.programs.config.path)
        except ConfigError as exc:
            raise ControlError(f"invalid configuration:\n{exc}", usage=True) from exc

    async def reread(self) -> dict[str, Any]:
        """What `reload` would change now, without changing anything (supervisorctl's
        `reread`)."""
        current = self.programs.config
        new_config = await self.read_configuration()
        summary: dict[str, Any] = dict(
            diff_programs(current.programs, new_config.programs).summary()
        )
        summary["supervisor_settings_kept"] = changed_settings(
            current.supervisor, new_config.supervisor
        )
        summary["dry_run"] = True
        return summary

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            programs = self.programs
            current = programs.config
            try:
                new_config = await trio.to_thread.run_sync(load_config, current.path)
            except ConfigError as exc:
                log.error("reload_failed", error=str(exc))
                raise ControlError(
                    f"configuration not reloaded, nothing changed:\n{exc}", usage=True
                ) from exc
            kept = changed_settings(current.supervisor, new_config.supervisor)
            if kept:
                log.warning("supervisor_settings_kept", keys=kept, apply_by="restarting")
            new_config = with_running_settings(new_config, current.supervisor)
            diff = diff_programs(current.programs, new_config.programs)
            log.info("reload", **diff.summary())
            await programs.stop_programs([n for n in diff.removed if n in programs.runners])
            for name in diff.removed:
                await programs.remove(name)
            safety_images = await self._pre_deploy_checkpoints(diff)
            stopped_by_hand = {
                n
                for n in diff.changed
                if programs.runners[n].state == State.STOPPED
                and not programs.runners[n].dependency_waits
            }
            await programs.stop_until_stopped(list(diff.changed))
            old_programs = current.programs
            for name in diff.changed:
                programs.forget(name)
            programs.config = new_config
            for name in diff.updated:
                programs.update(new_config.programs[name])
            for name in new_config.start_order():
                if name in diff.added or name in diff.changed:
                    self.rollbacks.pop(name, None)
                    await programs.add(new_config.programs[name])
            deployed = [
                n
                for n in new_config.start_order()
                if n in diff.added or (n in diff.changed and n not in stopped_by_hand)
            ]
            summary: dict[str, Any] = dict(diff.summary())
            summary["supervisor_settings_kept"] = kept
            summary["pre_deploy_images"] = {n: img.id for n, img in safety_images.items()}
            summary["left_stopped"] = sorted(stopped_by_hand)
            summary["rolled_back"] = await self._deploy(deployed, safety_images, old_programs)
            summary["failed"] = {
                n: self._failure_of(n)
                for n in deployed
                if n not in summary["rolled_back"]
                and programs.runners[n].config.autostart
                and programs.runners[n].state != State.RUNNING
            }
            if summary["failed"]:
                log.error("reload_programs_failed", programs=summary["failed"])
            return summary

    def _failure_of(self, name: str) -> str:
        runner = self.programs.runners[name]
        reason = runner.machine.reason
        return f"{runner.state.value}: {reason}" if reason else runner.state.value

    async def reload_logging_errors(self) -> None:
        """A reload asked for by SIGHUP: nobody to answer (reload() has logged why)."""
        with contextlib.suppress(ControlError):
            await self.reload()

    async def _pre_deploy_checkpoints(self, diff: ProgramDiff) -> dict[str, ImageMeta]:
        """Checkpoint each running program that is about to be replaced, when it opts in."""
        images: dict[str, ImageMeta] = {}
        if self.checkpoints is None:
            return images
        for name in diff.changed:
            runner = self.programs.runners[name]
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
            state = await self.programs.start_after_dependencies(name)
            image = safety_images.get(name)
            old = old_programs.get(name)
            if state == State.RUNNING or image is None or old is None:
                return
            if not old.checkpoint.rollback or self.checkpoints is None:
                return
            reason = self.programs.runners[name].machine.reason or f"new instance is {state.value}"
            await self._roll_back(name, old, image, reason)
            rolled_back.append(name)

        if not names:
            return rolled_back
        async with trio.open_nursery() as nursery:
            for name in names:
                if self.programs.runners[name].config.autostart:
                    nursery.start_soon(deploy_one, name)
        return rolled_back

    async def _roll_back(
        self, name: str, old: ProgramConfig, image: ImageMeta, reason: str
    ) -> None:
        assert self.checkpoints is not None
        log.warning("deploy_rolled_back", program=name, image_id=image.id, reason=reason)
        failed = self.programs.runners[name]
        with failed.leaving_dependents_alone():  # a rollback never stops its dependents
            await failed.stop(failed.stop_timeout_bound())
        self.programs.forget(name)
        self.programs.config.programs[name] = old
        runner = await self.programs.add(old)
        service = self.checkpoints
        self.rollbacks[name] = f"rolled back to {image.id[:12]}: {reason}"
        await runner.start(
            start_timeout_bound(old),
            lambda r: service.launch_with_fallback(r, image, occasion="rollback"),
        )
