"""The commands answered by the running supervisor through its control socket.

Standard library only (the formatting included): a command that talks to the supervisor
loads nothing else, so it answers quickly."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from grenadine_sv.cli.config_path import config_path_of
from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE
from grenadine_sv.cli.formatting import (
    format_checkpoints,
    format_prune,
    format_reload,
    format_restore,
    format_status,
    print_json,
    restore_succeeded,
)
from grenadine_sv.control.client import control_socket_of, request
from grenadine_sv.control.protocol import ControlError, SupervisorNotRunning

# A remote request waits at most this long for the supervisor's reply.
REQUEST_TIMEOUT_SECONDS = 600.0


def remote(args: argparse.Namespace, out: TextIO) -> int:
    """Commands answered by the running supervisor through its control socket.

    Only the socket's path is read from the configuration: the running supervisor has its
    own, validated copy, and a file being edited does not lock the user out."""
    socket_path = control_socket_of(config_path_of(args))
    if socket_path is None:
        from grenadine_sv.cli.local import load_or_explain

        config = load_or_explain(args)
        if config is None:
            return EXIT_USAGE
        socket_path = config.supervisor.control_socket
    request_args: dict[str, Any] = {}
    for key in ("names", "stop", "keep", "allow_changed_definition"):
        if getattr(args, key, None) is not None:
            request_args[key] = getattr(args, key)
    for key in ("name", "image"):
        if getattr(args, key, None) is not None:
            request_args[key] = getattr(args, key)
    try:
        result = request(socket_path, args.command, request_args, REQUEST_TIMEOUT_SECONDS)
    except SupervisorNotRunning as exc:
        print(f"grenadine-sv: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"grenadine-sv: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, json.JSONDecodeError) as exc:
        print(f"grenadine-sv: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print_json(result, out)
    else:
        out.write(format_result(args.command, result))
    return operation_exit_code(args.command, result)


def format_result(command: str, result: Any) -> str:
    """The human form of a supervisor's reply; unknown shapes are printed as JSON."""
    formatters: dict[str, Callable[[Any], str]] = {
        "status": format_status,
        "start": format_status,
        "stop": format_status,
        "restart": format_status,
        "checkpoint": format_checkpoints,
        "restore": format_restore,
        "reload": format_reload,
        "prune": format_prune,
    }
    formatter = formatters.get(command)
    if formatter is None:
        return json.dumps(result, indent=2, default=str) + "\n"
    return formatter(result)


def operation_exit_code(command: str, result: Any) -> int:
    """EXIT_FAILED when the supervisor answered but did not do what was asked."""
    wanted = {"start": {"RUNNING"}, "restart": {"RUNNING"}, "stop": {"STOPPED", "EXITED", "FATAL"}}
    failed = False
    if command in wanted:
        failed = any(entry.get("state") not in wanted[command] for entry in result)
    elif command == "checkpoint":
        failed = any(not entry.get("ok") for entry in result)
    elif command == "restore":
        failed = not restore_succeeded(result)
    elif command == "reload":
        failed = bool(result.get("rolled_back"))
    return EXIT_FAILED if failed else EXIT_OK
