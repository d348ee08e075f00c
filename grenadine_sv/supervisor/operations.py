"""What an operator can ask of a running supervisor, as the control socket's handler needs it
(control.handler.Supervised): each request handed to the part of the supervisor that owns it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grenadine_sv.supervisor.checkpointing import Checkpointing
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.supervisor.runner import ProgramRunner


class Operations:
    """The supervisor as the control socket sees it (implements control.handler.Supervised)."""

    def __init__(
        self,
        programs: Programs,
        deploys: Deploys,
        checkpointing: Checkpointing,
        request_shutdown: Callable[[], None],
    ) -> None:
        self.programs = programs
        self.deploys = deploys
        self.checkpointing = checkpointing
        self.request_shutdown = request_shutdown

    def select(self, names: list[str]) -> list[str]:
        return self.programs.select(names)

    def status(self, names: list[str]) -> list[dict[str, Any]]:
        return [self.describe(self.programs.runners[n]) for n in names]

    def describe(self, runner: ProgramRunner) -> dict[str, Any]:
        """One program's line of `status`."""
        machine = runner.machine
        return {
            "name": runner.name,
            "state": machine.state.value,
            "pid": machine.pid,
            "uptime_seconds": runner.uptime(),
            "restarts": machine.restart_count,
            "exit_status": machine.last_exit,
            "reason": self.deploys.rollbacks.get(runner.name) or machine.reason,
            "last_checkpoint": self.last_checkpoint(runner.name),
        }

    def last_checkpoint(self, name: str) -> dict[str, Any] | None:
        service = self.checkpointing.service
        if service is None:
            return None
        image = service.images_of(name).last_checkpoint
        if image is None:
            return None
        return {"id": image.id, "created": image.created.isoformat(), "trigger": image.trigger}

    async def start_programs(self, names: list[str]) -> None:
        await self.programs.start_programs(names)

    async def stop_programs(self, names: list[str]) -> None:
        await self.programs.stop_programs(names)

    async def reload(self) -> dict[str, Any]:
        return await self.deploys.reload()

    async def checkpoint_programs(self, names: list[str], stop: bool) -> list[dict[str, Any]]:
        return await self.checkpointing.checkpoint_programs(names, stop)

    async def restore_program(
        self, name: str, ref: str, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]:
        restored = await self.checkpointing.restore_program(
            name, ref, allow_changed_definition=allow_changed_definition
        )
        return restored | self.describe(self.programs.runners[name])

    async def prune(self, names: list[str], keep: int | None) -> dict[str, list[str]]:
        return await self.checkpointing.prune(names, keep)
