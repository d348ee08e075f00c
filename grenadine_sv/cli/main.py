"""The grenadine-sv command: argument parsing and dispatch to a command."""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NoReturn, Protocol, TextIO

from grenadine_sv import __version__
from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Exit
from grenadine_sv.cli.remote import remote

# Commands done by this process; the others are requests to the running supervisor.
LOCAL_COMMANDS = frozenset(
    {
        "run",
        "check",
        "doctor",
        "schema",
        "logs",
        "images",
        "maintail",
        "import-supervisord",
        "export",
        "import",
    }
)
# Other names a command answers to, as supervisorctl users type them.
ALIASES = {"tail": "logs", "update": "reload"}
DEFAULT_LOG_LINES = 10


class Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean for a mistyped command."""

    def error(self, message: str) -> NoReturn:
        wrong = re.search(r"invalid choice: '([^']*)'", message)
        if wrong and self._subparsers is not None:
            commands = [
                name
                for action in self._subparsers._group_actions
                if isinstance(action, argparse._SubParsersAction)
                for name in action.choices
            ]
            import difflib  # for a mistyped command only

            close = difflib.get_close_matches(wrong.group(1), commands, n=1)
            if close:
                message = f"unknown command {wrong.group(1)!r}; did you mean {close[0]!r}?"
        super().error(message)


def help_width() -> int:
    """The width argparse gives its help (the terminal's, less 2), found as it does but without
    importing shutil for it, which every command would pay for."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns - 2


def count(text: str) -> int:
    """A whole number of 0 or more, for options such as --keep and -n."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


class ArgumentSink(Protocol):
    def add_argument(self, *args: Any, **kwargs: Any) -> object: ...


class SkippedCommand:
    """Takes the arguments of a subcommand that this run does not build."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass


SKIPPED = SkippedCommand()


def command_word(argv: Sequence[str]) -> str | None:
    """The command an argument list names (skipping -c FILE before it), or None."""
    words = iter(argv)
    for word in words:
        if word in ("-c", "--config"):
            next(words, None)
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the subcommand of that name alone (or all of them
    if no command has that name). Every command answers a little sooner when argparse builds
    its own subparser alone: the full set takes longer than the request to the supervisor."""
    width = help_width()
    parser = Parser(
        prog="grenadine-sv",
        description="Supervise daemons in namespace sandboxes; "
        "checkpoint and restore them with CRIU.",
        epilog="exit codes: 0 ok, 1 failed, 2 bad usage or invalid configuration, "
        "3 no supervisor running",
        formatter_class=partial(argparse.HelpFormatter, width=width),
    )
    config_help = "configuration file (TOML); accepted before or after the command"
    parser.add_argument("-c", "--config", help=config_help)
    parser.add_argument("--version", action="version", version=f"grenadine-sv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(
        name: str, help_text: str, *, json_output: bool = False, aliases: Sequence[str] = ()
    ) -> ArgumentSink:
        if only is not None and only != name and only not in aliases:
            return SKIPPED
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            aliases=list(aliases),
            formatter_class=partial(argparse.ArgumentDefaultsHelpFormatter, width=width),
        )
        # -c after the command too: SUPPRESS keeps a value given before the command.
        command.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
        if json_output:
            command.add_argument("--json", action="store_true", help="print JSON for scripts")
        return command

    add("run", "run the supervisor in the foreground (the default)")
    add("status", "one line per program (exit 1 if one is FATAL)", json_output=True).add_argument(
        "names", nargs="*"
    )
    for verb in ("start", "stop", "restart"):
        add(verb, f"{verb} programs (or all)", json_output=True).add_argument("names", nargs="+")
    add(
        "reload",
        "re-read the configuration and apply the difference (alias: update)",
        json_output=True,
        aliases=["update"],
    )
    add("reread", "show what reload would change, without changing it", json_output=True)
    add("avail", "the programs of the configuration file, and which run", json_output=True)
    signal_command = add(
        "signal", "send a signal to programs: signal SIG NAME... (or NAME... SIG)", json_output=True
    )
    signal_command.add_argument("words", nargs="+", metavar="SIG|NAME")
    add("clear", "empty programs' captured output", json_output=True).add_argument(
        "names", nargs="+"
    )
    maintail = add("maintail", "show the supervisor's own log (log_dir/grenadine-sv.log)")
    maintail.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    maintail.add_argument(
        "-n", "--lines", type=count, default=DEFAULT_LOG_LINES, help="lines from the end to show"
    )
    migrate = add(
        "import-supervisord",
        "translate a supervisord configuration into grenadine.toml and conf.d/*.toml",
    )
    migrate.add_argument("file", help="supervisord.conf (its [include] files too)")
    migrate.add_argument("-o", "--output", default="grenadine-sv-import", help="directory to write")
    migrate.add_argument("--force", action="store_true", help="overwrite files already there")
    ctl = add("ctl", "an interactive shell (readline), or run one command: ctl COMMAND ...")
    ctl.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND")
    logs = add("logs", "show a program's captured output (alias: tail)", aliases=["tail"])
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    logs.add_argument(
        "-n", "--lines", type=count, default=DEFAULT_LOG_LINES, help="lines from the end to show"
    )
    check = add("check", "validate the configuration and exit (0 valid, 2 invalid)")
    check.add_argument(
        "--strict", action="store_true", help="treat warnings (missing command, ...) as errors"
    )
    add("doctor", "report what CRIU needs on this host and what will not work", json_output=True)
    add("schema", "print the JSON Schema of the configuration")
    add("shutdown", "stop every program and the supervisor (as SIGTERM), and wait for it")
    pid = add("pid", "print the supervisor's pid, or a program's (all: every program's)")
    pid.add_argument("name", nargs="?")
    add_checkpoint_commands(add)
    add_transfer_commands(add)
    if only is not None and not sub.choices:
        return build_parser()
    return parser


def add_checkpoint_commands(add: Callable[..., ArgumentSink]) -> None:
    checkpoint = add("checkpoint", "checkpoint programs now", json_output=True)
    checkpoint.add_argument("names", nargs="*")
    checkpoint.add_argument("--stop", action="store_true", help="stop the program after the dump")
    checkpoint.add_argument(
        "--all",
        action="store_true",
        dest="signal_round",
        help="the programs with checkpoint.on_signal = true, as SIGUSR1 does",
    )
    restore = add("restore", "restore a program from an image", json_output=True)
    restore.add_argument("name")
    restore.add_argument(
        "image",
        help="image id, unique id prefix, IDX from `images`, or latest; "
        "remote:ID or remote:latest for the object store's",
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="restore a RUNNING program even if its memory cannot be checkpointed first",
    )
    restore.add_argument(
        "--allow-changed-definition",
        action="store_true",
        default=None,
        help="restore even if the program's definition changed since the image was taken",
    )
    images = add("images", "list checkpoint images", json_output=True)
    images.add_argument("name", nargs="?")
    images.add_argument(
        "--all", action="store_true", help="also images of programs no longer configured"
    )
    images.add_argument(
        "--remote", action="store_true", help="the object store's images ([supervisor.remote])"
    )
    prune = add("prune", "delete old images", json_output=True)
    prune.add_argument("name", nargs="?", help="a program (also one no longer configured)")
    prune.add_argument(
        "--keep",
        type=count,
        help="images to keep per program (default: its checkpoint.keep; 0 if not configured)",
    )
    prune.add_argument(
        "--force", action="store_true", help="also delete the image a pinned restore names"
    )
    rmi = add("rmi", "remove images of a program (corrupt ones too)", json_output=True)
    rmi.add_argument("name")
    rmi.add_argument("images", nargs="+", metavar="IMAGE", help="image id, id prefix or IDX")
    rmi.add_argument(
        "--force", action="store_true", help="also remove the image a pinned restore names"
    )


def add_transfer_commands(add: Callable[..., ArgumentSink]) -> None:
    export = add("export", "write an image as one archive (to move it to another host)")
    export.add_argument("name")
    export.add_argument("image", help="image id, unique id prefix, IDX from `images`, or latest")
    export.add_argument(
        "-o", "--output", help="archive file, or - for standard output (default: NAME-ID.tar...)"
    )
    export.add_argument("--compress", choices=("zstd", "none"), default="zstd")
    export.add_argument(
        "--no-encrypt",
        action="store_true",
        help="write an unencrypted archive (the image holds the process's memory, secrets too)",
    )
    imported = add("import", "add an image from an archive made by export (FILE or -)")
    imported.add_argument("file")
    imported.add_argument(
        "--allow-changed-definition",
        action="store_true",
        help="import an image made by a different definition of the program",
    )


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=command_word(words))
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    command = ALIASES.get(args.command, args.command) or "run"
    args.command = command
    if command != "run":
        # `kill -USR1` aimed at a supervisor must not end a client that shares its name.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    out = sys.stdout
    try:
        code = dispatch(command, args, out)
        out.flush()
    except Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback, and none when Python flushes at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    return code


def entry() -> NoReturn:
    """The installed command. A request to the supervisor ends without the interpreter's
    teardown (a few ms of every such command): it has printed everything, flushed here, and
    holds nothing else to close."""
    code = main()
    command = command_word(sys.argv[1:])
    if command is not None and ALIASES.get(command, command) not in LOCAL_COMMANDS | {"ctl"}:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a reader gone (`| head`), a full disk
            code = EXIT_FAILED
        os._exit(code)
    sys.exit(code)


def dispatch(command: str, args: argparse.Namespace, out: TextIO) -> int:
    if command == "ctl":
        from grenadine_sv.cli.shell import ctl

        return ctl(args, out)
    if command not in LOCAL_COMMANDS:
        return remote(args, out)
    if command == "run":
        gc.disable()  # until local.run has loaded everything: see its settle_heap
    try:
        return _dispatch_local(command, args, out)
    finally:
        gc.enable()


def _dispatch_local(command: str, args: argparse.Namespace, out: TextIO) -> int:
    # Loaded only for these commands: they need the configuration models and more, which a
    # command answered by the running supervisor does not.
    from grenadine_sv.cli import local, transfer

    if command != "run":
        local.log_to_stderr()  # stdout carries the command's output only
    handlers: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
        "run": local.run,
        "check": local.check,
        "doctor": local.doctor,
        "schema": local.schema,
        "logs": local.logs,
        "images": local.images,
        "maintail": local.maintail,
        "import-supervisord": local.import_supervisord,
        "export": transfer.export,
        "import": transfer.import_archive,
    }
    return handlers[command](args, out)


if __name__ == "__main__":
    raise SystemExit(main())
