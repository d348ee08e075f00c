"""The sub-commands of grenadine-sv; each returns an exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from grenadine_sv.cli.formatting import (
    format_checkpoints,
    format_images,
    format_prune,
    format_reload,
    format_restore,
    format_status,
    restore_succeeded,
)
from grenadine_sv.cli.main import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    Exit,
    default_config_path,
    print_json,
)
from grenadine_sv.control.client import (
    ControlError,
    SupervisorNotRunning,
    control_socket_of,
    request,
)

if TYPE_CHECKING:
    from grenadine_sv.config.loading import Config

# A remote request waits at most this long for the supervisor's reply.
REQUEST_TIMEOUT_SECONDS = 600.0


def config_path_of(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config is not None else default_config_path()


def load_or_explain(args: argparse.Namespace) -> Config | None:
    from grenadine_sv.config.loading import ConfigError, load_config

    path = config_path_of(args)
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"grenadine-sv: invalid configuration, nothing started:\n{exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace, out: TextIO) -> int:
    import trio

    from grenadine_sv.logs import configure_logging
    from grenadine_sv.sandbox.linux import set_process_name
    from grenadine_sv.supervisor.core import StartupError, build_supervisor

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    configure_logging(config.supervisor.log_format, config.supervisor.log_level)
    try:
        set_process_name("grenadine-sv")
        trio.run(build_supervisor(config).run)
    except (StartupError, ControlError, ExceptionGroup) as raised:
        reason = startup_failure(raised)
        if reason is None:
            raise
        print(f"grenadine-sv: cannot start: {reason}", file=sys.stderr)
        configuration = isinstance(reason, StartupError) and reason.configuration
        return EXIT_USAGE if configuration else EXIT_FAILED
    return EXIT_OK


def startup_failure(raised: BaseException) -> Exception | None:
    """The StartupError or ControlError that stopped the supervisor from starting, if that is
    what happened (trio may deliver it inside exception groups)."""
    from grenadine_sv.supervisor.core import StartupError

    while isinstance(raised, BaseExceptionGroup) and len(raised.exceptions) == 1:
        raised = raised.exceptions[0]
    return raised if isinstance(raised, StartupError | ControlError) else None


def check(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.config.host_checks import host_warnings

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    warnings = host_warnings(config)
    for warning in warnings:
        print(f"grenadine-sv: warning: {warning}", file=sys.stderr)
    if warnings and args.strict:
        print(f"grenadine-sv: {len(warnings)} warnings, and --strict", file=sys.stderr)
        return EXIT_USAGE
    files = ", ".join(str(f) for f in config.files)
    out.write(f"configuration valid: {len(config.programs)} programs from {files}\n")
    return EXIT_OK


def doctor(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.host.doctor import run_doctor

    criu_path: Path | None = None
    if args.config is not None:
        config = load_or_explain(args)
        if config is None:
            return EXIT_USAGE
        criu_path = config.supervisor.criu
    return run_doctor(as_json=args.json, out=out, criu_path=criu_path)


def schema(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.config.loading import config_json_schema

    print_json(config_json_schema(), out)
    return EXIT_OK


def logs(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.cli.tailing import start_of_last_lines

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    program = config.programs.get(args.name)
    if program is None:
        print(f"grenadine-sv: no such program: {args.name}", file=sys.stderr)
        return EXIT_USAGE
    log_dir = config.supervisor.log_dir
    path = program.stderr_path(log_dir) if args.stderr else program.stdout_path(log_dir)
    if not args.follow:
        if not path.exists():
            return EXIT_OK
        with path.open("rb") as log_file:
            log_file.seek(start_of_last_lines(log_file, args.lines))
            shutil.copyfileobj(log_file, sys.stdout.buffer)
        return EXIT_OK
    return follow_log(path, args.lines)


def follow_log(path: Path, lines: int) -> int:
    """Print the last `lines` lines of `path`, then what is written to it, like `tail -F`."""
    import trio

    from grenadine_sv.cli.tailing import start_of_last_lines
    from grenadine_sv.supervisor.output import follow

    from_end = 0
    with contextlib.suppress(FileNotFoundError), path.open("rb") as log_file:
        size = log_file.seek(0, os.SEEK_END)
        from_end = size - start_of_last_lines(log_file, lines)

    async def stream() -> None:
        async with contextlib.aclosing(follow(path, from_end)) as chunks:
            async for chunk in chunks:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    trio.run(stream)
    return EXIT_OK


def images(args: argparse.Namespace, out: TextIO) -> int:
    from grenadine_sv.store.images import ImageStore

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    store = ImageStore(config.supervisor.state_dir)
    listed = store.list(args.name)
    if args.name is not None and args.name not in config.programs and not listed:
        print(f"grenadine-sv: no such program: {args.name}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print_json([image.model_dump(mode="json") for image in listed], out)
    else:
        out.write(format_images(listed))
    return EXIT_OK


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


def checkpoint(args: argparse.Namespace, out: TextIO) -> int:
    if bool(args.names) == args.signal_round:
        print(
            "grenadine-sv: checkpoint: name programs (or all), or give --all for the programs "
            "with checkpoint.on_signal = true",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return remote(args, out)


def socket_path_of(args: argparse.Namespace) -> Path | None:
    """Only the socket's path is read from the configuration: the running supervisor has its
    own, validated copy, and a file being edited does not lock the user out."""
    socket_path = control_socket_of(config_path_of(args))
    if socket_path is None:
        config = load_or_explain(args)
        if config is None:
            return None
        socket_path = config.supervisor.control_socket
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


def report_error(message: str, code: int, as_json: bool) -> NoReturn:
    """An error on stderr; with --json also as a JSON object on stdout, for scripts."""
    print(f"grenadine-sv: {message}", file=sys.stderr)
    if as_json:
        print_json({"error": message, "exit_code": code}, sys.stdout)
    raise Exit(code)


def remote(args: argparse.Namespace, out: TextIO) -> int:
    """Commands answered by the running supervisor through its control socket."""
    request_args: dict[str, Any] = {}
    for key in ("names", "stop", "keep", "name", "image", "signal_round"):
        if getattr(args, key, None) is not None:
            request_args[key] = getattr(args, key)
    result = ask(args, args.command, request_args)
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
        failed = bool(result.get("rolled_back") or result.get("failed"))
    elif command == "status":
        failed = any(entry.get("state") == "FATAL" for entry in result)
    return EXIT_FAILED if failed else EXIT_OK
