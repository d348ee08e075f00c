"""The control socket's wire format, shared by the server and the stdlib-only client.

A Unix socket speaking JSON lines, one request and one reply each:

Request:  {"command": "status", "args": {...}}
Reply:    {"ok": true, "result": ...}  or  {"ok": false, "error": "sentence"}

Standard library only: the command line imports this module.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

# A string, not a Path: the command line does without pathlib (its import is a few ms of
# every command).
DEFAULT_CONTROL_SOCKET = "/run/grenadine-sv.sock"
MAX_LINE_BYTES = 1 << 20


class ControlError(Exception):
    """A request the supervisor refused; the message is shown to the user.

    `usage` marks a request that could never succeed as asked (an unknown program, a bad
    argument, an invalid configuration): the command line exits 2 for it, not 1."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class SupervisorNotRunning(Exception):
    pass


class ProtocolError(Exception):
    """A request line that is not a request."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON; absurdly deep nesting
        raise ProtocolError(f"not a JSON object: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a request must be a JSON object")
    command = message.get("command")
    args = message.get("args", {})
    if not isinstance(command, str) or not isinstance(args, dict):
        raise ProtocolError('a request needs "command" (a string) and optional "args" (an object)')
    return command, args


def socket_is_live(path: str | os.PathLike[str]) -> bool:
    """True when something accepts connections on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
