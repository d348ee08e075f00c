"""The commands answered by the running supervisor through its control socket.

Standard library only (the formatting included): a command that talks to the supervisor
loads nothing else, so it answers quickly."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from grenadine_sv.cli.config_path import config_path_of
from grenadine_sv.cli.exit_codes import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    Exit,
)
from grenadine_sv.cli.formatting import (
    format_avail,
    format_checkpoints,
    format_cleared,
    format_prune,
    format_reload,
    format_removed,
    format_reread,
    format_restore,
    format_signalled,
    format_status,
    print_json,
    restore_succeeded,
)
from grenadine_sv.control.client import control_socket_of, request
from grenadine_sv.control.protocol import ControlError, SupervisorNotRunning

# A remote request waits at most this long for the supervisor's reply.
REQUEST_TIMEOUT_SECONDS = 600.0
SHUTDOWN_POLL_SECONDS = 0.05


def pid(args: argparse.Namespace, out: TextIO) -> int:
    """The supervisor's pid (`kill -USR1 $(grenadine-sv pid)`), or programs' pids."""
    if args.name is None:
        answered = ask(args, "ping", {})
        out.write(f"{answered['pid']}\n")
        return EXIT_OK
    entries = ask(args, "status", {"names": [args.name]})
    if args.name != "all":
        entry = entries[0]
        if entry.get("pid") is None:
            print(f"grenadine-sv: {entry['name']} is {entry['state']}", file=sys.stderr)
            return EXIT_FAILED
        out.write(f"{entry['pid']}\n")
        return EXIT_OK
    for entry in entries:
        out.write(f"{entry['name']} {entry['pid'] if entry.get('pid') is not None else '-'}\n")
    return EXIT_OK


def send_signal(args: argparse.Namespace, out: TextIO) -> int:
    """`signal SIG NAME...` as supervisorctl has it, or `signal NAME... SIG`."""
    words: list[str] = args.words
    if len(words) >= 2 and is_signal_name(words[0]):
        args.signal, args.names = words[0], words[1:]
    elif len(words) >= 2 and is_signal_name(words[-1]):
        args.signal, args.names = words[-1], words[:-1]
    else:
        print(
            "grenadine-sv: signal: give a signal (HUP, USR1, TERM, ...) and programs (or all)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return request_and_print(args, out)


def is_signal_name(word: str) -> bool:
    return f"SIG{word.upper().removeprefix('SIG')}" in signal.Signals.__members__


def shutdown(args: argparse.Namespace, out: TextIO) -> int:
    """Ask the supervisor to stop (as SIGTERM does) and wait until it has exited."""
    supervisor_pid = int(ask(args, "shutdown", {})["pid"])
    deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
    while process_exists(supervisor_pid):
        if time.monotonic() > deadline:
            print(
                f"grenadine-sv: the supervisor (pid {supervisor_pid}) is still stopping after "
                f"{REQUEST_TIMEOUT_SECONDS:g}s",
                file=sys.stderr,
            )
            return EXIT_FAILED
        time.sleep(SHUTDOWN_POLL_SECONDS)
    out.write(f"shut down (pid {supervisor_pid})\n")
    return EXIT_OK


def process_exists(pid: int) -> bool:
    """True while `pid` names a process that has not been reaped (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def checkpoint(args: argparse.Namespace, out: TextIO) -> int:
    if bool(args.names) == args.signal_round:
        print(
            "grenadine-sv: checkpoint: name programs (or all), or give --all for the programs "
            "with checkpoint.on_signal = true",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return request_and_print(args, out)


def socket_path_of(args: argparse.Namespace) -> str | os.PathLike[str] | None:
    """Only the socket's path is read from the configuration: the running supervisor has its
    own, validated copy, and a file being edited does not lock the user out."""
    socket_path = control_socket_of(config_path_of(args))
    if socket_path is None:
        from grenadine_sv.cli.local import load_or_explain

        config = load_or_explain(args)
        if config is None:
            return None
        return config.supervisor.control_socket
    return socket_path


def ask(args: argparse.Namespace, command: str, request_args: dict[str, Any]) -> Any:
    """The supervisor's answer; raises Exit after printing why there is none."""
    socket_path = socket_path_of(args)
    if socket_path is None:
        raise Exit(EXIT_USAGE)
    as_json = getattr(args, "json", False)
    try:
        return request(socket_path, command, request_args, REQUEST_TIMEOUT_SECONDS)
    except SupervisorNotRunning as exc:
        report_error(str(exc), EXIT_NOT_RUNNING, as_json)
    except ControlError as exc:
        code = EXIT_USAGE if exc.usage else EXIT_FAILED
        report_error(f"{command} failed: {exc}", code, as_json)
    except (OSError, json.JSONDecodeError) as exc:
        report_error(f"{command} failed: {exc}", EXIT_FAILED, as_json)


def ask_with_progress(args: argparse.Namespace, request_args: dict[str, Any]) -> Any:
    """`ask`, with a progress line on a terminal for a checkpoint or a restore."""
    if args.command not in ("checkpoint", "restore") or not sys.stderr.isatty():
        return ask(args, args.command, request_args)
    from grenadine_sv.cli.progress import progress_line, state_dir_of

    programs = request_args.get("names") or [request_args.get("name", "")]
    action = f"{args.command} {', '.join(programs) or 'programs'}"
    # `checkpoint --all` names none: every program's dump is watched.
    state_dir = state_dir_of(config_path_of(args)) if args.command == "checkpoint" else None
    with progress_line(action, state_dir, programs):
        return ask(args, args.command, request_args)


def report_error(message: str, code: int, as_json: bool) -> NoReturn:
    """An error on stderr; with --json also as a JSON object on stdout, for scripts."""
    print(f"grenadine-sv: {message}", file=sys.stderr)
    if as_json:
        print_json({"error": message, "exit_code": code}, sys.stdout)
    raise Exit(code)


def remote(args: argparse.Namespace, out: TextIO) -> int:
    """Commands answered by the running supervisor through its control socket."""
    special = {
        "pid": pid,
        "checkpoint": checkpoint,
        "shutdown": shutdown,
        "signal": send_signal,
    }.get(args.command, request_and_print)
    return special(args, out)


def request_and_print(args: argparse.Namespace, out: TextIO) -> int:
    """Send the command with its arguments; print the reply for a human, or as JSON."""
    request_args: dict[str, Any] = {}
    keys = ("names", "stop", "keep", "name", "image", "images", "signal_round", "force", "signal")
    for key in (*keys, "allow_changed_definition"):
        if getattr(args, key, None) is not None:
            request_args[key] = getattr(args, key)
    result = ask_with_progress(args, request_args)
    if getattr(args, "json", False):
        print_json(result, out)
    else:
        out.write(format_result(args.command, result, colours=wants_colours(out)))
    return operation_exit_code(args.command, result)


def wants_colours(out: TextIO) -> bool:
    """Colours on a terminal only, and never with NO_COLOR set (no-color.org)."""
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def format_result(command: str, result: Any, colours: bool = False) -> str:
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
        "rmi": format_removed,
        "reread": format_reread,
        "avail": format_avail,
        "signal": format_signalled,
        "clear": format_cleared,
    }
    if command in ("status", "start", "stop", "restart") and colours:
        return format_status(result, colours=True)
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
        failed = bool(result.get("rolled_back") or result.get("failed"))
    elif command == "status":
        failed = any(entry.get("state") == "FATAL" for entry in result)
    elif command == "signal":
        failed = not any(entry.get("sent") for entry in result)
    return EXIT_FAILED if failed else EXIT_OK
