"""The client side of the control socket, standard library only: the command line loads
nothing else to talk to a running supervisor, so every command answers quickly."""

from __future__ import annotations

import json
import os
import socket
import tomllib
from typing import Any

from grenadine_sv.control.protocol import (
    DEFAULT_CONTROL_SOCKET,
    ControlError,
    SupervisorNotRunning,
    encode,
)


def supervisor_settings(config_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The main file's [supervisor] table, read without validating anything ({} when it has
    none); None when the file cannot be read as TOML."""
    try:
        with open(config_path, "rb") as config_file:
            document = tomllib.load(config_file)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    settings = document.get("supervisor", {})
    return settings if isinstance(settings, dict) else {}


def beside_config(config_path: str | os.PathLike[str], value: str) -> str:
    """A path setting as the configuration means it: relative to the file's directory."""
    return os.path.realpath(os.path.join(os.path.dirname(os.fspath(config_path)), value))


def control_socket_of(config_path: str | os.PathLike[str]) -> str | None:
    """The control socket a configuration names, read without validating the rest of it
    (only the main file can set it); None when the file cannot tell (then the full
    validation explains why)."""
    settings = supervisor_settings(config_path)
    if settings is None:
        return None
    value = settings.get("control_socket")
    if value is None:
        return DEFAULT_CONTROL_SOCKET
    if not isinstance(value, str) or not value:
        return None
    return beside_config(config_path, value)


def request(
    path: str | os.PathLike[str], command: str, args: dict[str, Any], timeout: float = 120.0
) -> Any:
    """Send one request to the running supervisor (blocking client for the CLI)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise SupervisorNotRunning(
                f"no supervisor is running (nothing listens on {path})"
            ) from exc
        sock.sendall(encode({"command": command, "args": args}))
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise ControlError("the supervisor closed the connection without a reply")
    reply = json.loads(data)
    if not reply.get("ok"):
        error = str(reply.get("error", "unknown error"))
        raise ControlError(error, usage=bool(reply.get("usage")))
    return reply.get("result")


def answering_pid(path: str | os.PathLike[str], timeout: float = 1.0) -> int | None:
    """The pid of the supervisor that answers on `path`, or None when none answers within
    `timeout`. A supervisor accepts connections from its start (listening claims the
    socket) and answers once its image store is recovered: ready, unlike `socket_is_live`."""
    try:
        answered = request(path, "ping", {}, timeout=timeout)
    except (OSError, ValueError, ControlError, SupervisorNotRunning):
        return None
    pid = answered.get("pid") if isinstance(answered, dict) else None
    return pid if isinstance(pid, int) else None
