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

    async def checkpoint_signal_round(self, stop: bool) -> list[dict[str, Any]]:
        """What SIGUSR1 does, as a request: the RUNNING programs with on_signal = true."""
        ...

    async def restore_program(
        self, name: str, ref: str, force: bool = False, *, allow_changed_definition: bool = False
    ) -> dict[str, Any]: ...

    async def prune(
        self, names: list[str], keep: int | None, force: bool = False
    ) -> dict[str, list[str]]:
        """Retention; names may be programs no longer configured that still have images."""
        ...

    async def remove_images(
        self, name: str, refs: list[str], force: bool = False
    ) -> dict[str, list[str]]: ...

    def request_shutdown(self) -> None: ...

    def signal_programs(self, names: list[str], signal_name: str) -> list[dict[str, Any]]: ...

    def clear_logs(self, names: list[str]) -> list[str]: ...

    async def reread(self) -> dict[str, Any]:
        """What reload would change, without changing it."""
        ...

    async def avail(self) -> list[dict[str, Any]]:
        """The programs of the configuration file as it is now, and whether each runs."""
        ...


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


def flag_argument(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ControlError(f'"{key}" must be true or false, got {value!r}', usage=True)
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
            case "reread":
                return await sv.reread()
            case "avail":
                return await sv.avail()
            case "signal":
                selected = sv.select(names_argument(args))
                return sv.signal_programs(selected, text_argument(args, "signal"))
            case "clear":
                return sv.clear_logs(sv.select(names_argument(args)))
            case "checkpoint":
                stop = flag_argument(args, "stop")
                if flag_argument(args, "signal_round"):
                    return await sv.checkpoint_signal_round(stop)
                return await sv.checkpoint_programs(sv.select(names_argument(args)), stop)
            case "restore":
                return await sv.restore_program(
                    text_argument(args, "name"),
                    text_argument(args, "image"),
                    force=flag_argument(args, "force"),
                    allow_changed_definition=flag_argument(args, "allow_changed_definition"),
                )
            case "prune":
                name = args.get("name")
                selected = [text_argument(args, "name")] if name else []
                return await sv.prune(
                    selected, count_argument(args, "keep"), force=flag_argument(args, "force")
                )
            case "rmi":
                images = args.get("images")
                if not isinstance(images, list) or not images:
                    raise ControlError('"images" must name at least one image', usage=True)
                return await sv.remove_images(
                    text_argument(args, "name"),
                    [text_argument({"image": ref}, "image") for ref in images],
                    force=flag_argument(args, "force"),
                )
            case "ping":
                return {"pid": os.getpid()}
            case "shutdown":
                sv.request_shutdown()
                return {"pid": os.getpid()}
        raise ControlError(f"unknown command {command!r}", usage=True)
