"""The control socket's vocabulary: what each request means, with its arguments checked."""

from __future__ import annotations

import os
from typing import Any, Protocol

from grenadine_sv.control.protocol import ControlError


class Supervised(Protocol):
    """What the request handler needs from a running supervisor."""

    def select(self, names: list[str]) -> list[str]:
        """The program names a request means ("all" = every program); ControlError if unknown."""
        ...

    def status(self, names: list[str]) -> list[dict[str, Any]]:
        """One line of `status` for each of these (selected) programs."""
        ...

    async def start_programs(self, names: list[str]) -> None: ...

    async def stop_programs(self, names: list[str]) -> None: ...

    async def reload(self) -> dict[str, Any]: ...

    async def checkpoint_programs(self, names: list[str], stop: bool) -> list[dict[str, Any]]: ...

    async def restore_program(
        self, name: str, ref: str, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]: ...

    async def prune(self, names: list[str], keep: int | None) -> dict[str, list[str]]: ...

    def request_shutdown(self) -> None: ...


def names_argument(args: dict[str, Any]) -> list[str]:
    names = args.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ControlError(f'"names" must be a list of program names, got {names!r}')
    return names


def text_argument(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f'"{key}" must be a non-empty string, got {value!r}')
    return value


def count_argument(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError(f'"{key}" must be a whole number of 0 or more, got {value!r}')
    return value


class RequestHandler:
    """Turns one decoded request into a call on the supervisor; refusals are ControlError."""

    def __init__(self, supervisor: Supervised) -> None:
        self.supervisor = supervisor

    async def handle(self, command: str, args: dict[str, Any]) -> Any:
        sv = self.supervisor
        match command:
            case "status":
                return sv.status(sv.select(names_argument(args) or ["all"]))
            case "start" | "stop" | "restart":
                selected = sv.select(names_argument(args))
                if command != "start":
                    await sv.stop_programs(selected)
                if command != "stop":
                    await sv.start_programs(selected)
                return sv.status(selected)
            case "reload":
                return await sv.reload()
            case "checkpoint":
                stop = args.get("stop", False)
                if not isinstance(stop, bool):
                    raise ControlError(f'"stop" must be true or false, got {stop!r}')
                return await sv.checkpoint_programs(sv.select(names_argument(args)), stop)
            case "restore":
                allow = args.get("allow_changed_definition", False)
                if not isinstance(allow, bool):
                    raise ControlError(
                        f'"allow_changed_definition" must be true or false, got {allow!r}'
                    )
                return await sv.restore_program(
                    text_argument(args, "name"),
                    text_argument(args, "image"),
                    allow_changed_definition=allow,
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
        raise ControlError(f"unknown command {command!r}")
