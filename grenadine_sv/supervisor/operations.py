"""What an operator can ask of a running supervisor, as the control socket's handler needs it
(control.handler.Supervised): each request handed to the part of the supervisor that owns it."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.checkpointing import Checkpointing
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.supervisor.runner import ProgramRunner


def restored_from(runner: ProgramRunner) -> dict[str, Any] | None:
    """The image the running instance came from (None: it started from scratch)."""
    origin = runner.restored_from
    if origin is None or runner.process is None:
        return None
    return {
        "id": origin.image_id,
        "created": origin.created.isoformat(),
        "occasion": origin.occasion,
        "instead_of": origin.instead_of,
    }


# A program in these states has a process to signal.
SIGNALLABLE = frozenset({State.STARTING, State.RUNNING, State.STOPPING})


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
            "exit_requested": machine.last_exit_requested,
            "reason": self.deploys.rollbacks.get(runner.name) or machine.reason,
            "last_checkpoint": self.last_checkpoint(runner.name),
            "last_checkpoint_failure": self.last_checkpoint_failure(runner.name),
            "restored_from": restored_from(runner),
            "depends_on": list(runner.config.depends_on),
            "on_dependency_stop": runner.config.on_dependency_stop,
        }

    def last_checkpoint(self, name: str) -> dict[str, Any] | None:
        service = self.checkpointing.service
        if service is None:
            return None
        image = service.images_of(name).last_checkpoint
        if image is None:
            return None
        return {"id": image.id, "created": image.created.isoformat(), "trigger": image.trigger}

    def last_checkpoint_failure(self, name: str) -> dict[str, Any] | None:
        """The newest checkpoint that failed, when no checkpoint has succeeded since."""
        service = self.checkpointing.service
        if service is None:
            return None
        failure = service.images_of(name).last_failure
        if failure is None:
            return None
        return {"at": failure.at.isoformat(), "trigger": failure.trigger, "error": failure.error}

    def signal_programs(self, names: list[str], signal_name: str) -> list[dict[str, Any]]:
        """Send a signal to each selected program that runs (supervisorctl's `signal`)."""
        try:
            number = signal.Signals[f"SIG{signal_name.upper().removeprefix('SIG')}"]
        except KeyError:
            raise ControlError(f"no such signal: {signal_name!r}", usage=True) from None
        results = []
        for name in names:
            runner = self.programs.runners[name]
            sent = runner.process is not None and runner.state in SIGNALLABLE
            if sent:
                runner.send_signal(number)
            entry = {"program": name, "signal": number.name.removeprefix("SIG"), "sent": sent}
            results.append(entry | {"state": runner.state.value})
        return results

    def clear_logs(self, names: list[str]) -> list[str]:
        """Empty the programs' captured output (and its rotated files)."""
        for name in names:
            runner = self.programs.runners[name]
            runner.stdout_log.clear()
            runner.stderr_log.clear()
        return names

    async def reread(self) -> dict[str, Any]:
        return await self.deploys.reread()

    async def avail(self) -> list[dict[str, Any]]:
        """The programs of the configuration file as it is now, and whether each runs."""
        on_disk = await self.deploys.read_configuration()
        runners = self.programs.runners
        entries = [
            {
                "name": name,
                "in_use": name in runners,
                "autostart": program.autostart,
                "state": runners[name].state.value if name in runners else None,
            }
            for name, program in on_disk.programs.items()
        ]
        entries += [
            {
                "name": name,
                "in_use": True,
                "autostart": runner.config.autostart,
                "state": runner.state.value,
                "removed": True,
            }
            for name, runner in runners.items()
            if name not in on_disk.programs
        ]
        return entries

    async def start_programs(self, names: list[str]) -> None:
        await self.programs.start_programs(names)

    async def stop_programs(self, names: list[str]) -> None:
        await self.programs.stop_programs(names)

    async def reload(self) -> dict[str, Any]:
        return await self.deploys.reload()

    async def checkpoint_programs(self, names: list[str], stop: bool) -> list[dict[str, Any]]:
        return await self.checkpointing.checkpoint_programs(names, stop)

    async def checkpoint_signal_round(self, stop: bool) -> list[dict[str, Any]]:
        return await self.checkpointing.checkpoint_signal_round(stop)

    async def restore_program(
        self, name: str, ref: str, force: bool = False, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]:
        restored = await self.checkpointing.restore_program(
            name, ref, force, allow_changed_definition=allow_changed_definition
        )
        return restored | self.describe(self.programs.runners[name])

    async def prune(
        self, names: list[str], keep: int | None, force: bool = False
    ) -> dict[str, list[str]]:
        return await self.checkpointing.prune(names, keep, force)

    async def remove_images(
        self, name: str, refs: list[str], force: bool = False
    ) -> dict[str, list[str]]:
        return await self.checkpointing.remove_images(name, refs, force)
