"""The control socket's vocabulary: what each request means, with its arguments checked."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from grenadine_sv.control.server import ControlError

if TYPE_CHECKING:
    from grenadine_sv.supervisor.core import Supervisor
    from grenadine_sv.supervisor.runner import ProgramRunner


def describe(supervisor: Supervisor, runner: ProgramRunner) -> dict[str, Any]:
    """One program's line of `status`."""
    machine = runner.machine
    return {
        "name": runner.name,
        "state": machine.state.value,
        "pid": machine.pid,
        "uptime_seconds": runner.uptime(),
        "restarts": machine.restart_count,
        "exit_status": machine.last_exit,
        "reason": supervisor.rollbacks.get(runner.name) or machine.reason,
        "last_checkpoint": last_checkpoint(supervisor, runner.name),
        "last_checkpoint_failure": last_checkpoint_failure(supervisor, runner.name),
    }


def last_checkpoint(supervisor: Supervisor, name: str) -> dict[str, Any] | None:
    if supervisor.checkpoints is None:
        return None
    image = supervisor.checkpoints.images_of(name).last_checkpoint
    if image is None:
        return None
    return {"id": image.id, "created": image.created.isoformat(), "trigger": image.trigger}


def last_checkpoint_failure(supervisor: Supervisor, name: str) -> dict[str, Any] | None:
    """The newest checkpoint that failed, when no checkpoint has succeeded since."""
    if supervisor.checkpoints is None:
        return None
    failure = supervisor.checkpoints.images_of(name).last_failure
    if failure is None:
        return None
    return {"at": failure.at.isoformat(), "trigger": failure.trigger, "error": failure.error}


def names_argument(args: dict[str, Any]) -> list[str]:
    names = args.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ControlError(f'"names" must be a list of program names, got {names!r}', usage=True)
    return names


def text_argument(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f'"{key}" must be a non-empty string, got {value!r}', usage=True)
    return value


def count_argument(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError(
            f'"{key}" must be a whole number of 0 or more, got {value!r}', usage=True
        )
    return value


class RequestHandler:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def status(self, names: list[str]) -> list[dict[str, Any]]:
        sv = self.supervisor
        selected = sv.select(names) if names else sv.select(["all"])
        return [describe(sv, sv.runners[n]) for n in selected]

    async def handle(self, command: str, args: dict[str, Any]) -> Any:
        sv = self.supervisor
        match command:
            case "status":
                return self.status(names_argument(args))
            case "start" | "stop" | "restart":
                selected = sv.select(names_argument(args))
                if command != "start":
                    await sv.stop_programs(selected)
                if command != "stop":
                    await sv.start_programs(selected)
                return self.status(selected)
            case "reload":
                return await sv.reload()
            case "checkpoint":
                stop = args.get("stop", False)
                if not isinstance(stop, bool):
                    raise ControlError(f'"stop" must be true or false, got {stop!r}', usage=True)
                if args.get("signal_round") is True:
                    return await sv.checkpoint_signal_round(stop)
                return await sv.checkpoint_programs(sv.select(names_argument(args)), stop)
            case "restore":
                return await sv.restore_program(
                    text_argument(args, "name"), text_argument(args, "image")
                )
            case "prune":
                name = args.get("name")
                selected = sv.select([text_argument(args, "name")]) if name else []
                return await sv.prune(selected, count_argument(args, "keep"))
            case "ping":
                return {"pid": os.getpid()}
            case "shutdown":
                sv.request_shutdown()
                return {"pid": os.getpid()}
        raise ControlError(f"unknown command {command!r}", usage=True)
