"""`grenadine-sv ctl`: supervisorctl's interactive shell. Each line is a grenadine-sv command
run against the same configuration; readline keeps the history and completes command and
program names. Standard library only, like the rest of the client path."""

from __future__ import annotations

import argparse
import cmd
import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from grenadine_sv.cli.config_path import config_path_of
from grenadine_sv.cli.exit_codes import EXIT_OK
from grenadine_sv.control.client import control_socket_of, request

HISTORY_FILE = Path("~/.grenadine-sv_history")
HISTORY_LENGTH = 1000
# Commands that take program names, for completion.
PROGRAM_COMMANDS = frozenset(
    {
        "status",
        "start",
        "stop",
        "restart",
        "checkpoint",
        "restore",
        "images",
        "prune",
        "rmi",
        "logs",
        "tail",
        "pid",
        "signal",
        "clear",
    }
)


def ctl(args: argparse.Namespace, out: TextIO) -> int:
    """Run the words after `ctl` as one command, or read commands until EOF or `exit`."""
    from grenadine_sv.cli.main import main

    config = str(config_path_of(args))
    if args.words:
        return main(["-c", config, *args.words])
    shell = Shell(config, stdout=out)
    with readline_history(), contextlib.suppress(KeyboardInterrupt):
        shell.cmdloop()
    out.write("\n")
    return EXIT_OK


@contextlib.contextmanager
def readline_history() -> Iterator[object]:
    try:
        import readline
    except ImportError:  # no readline: the shell works, without history
        yield None
        return
    path = HISTORY_FILE.expanduser()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield readline
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)


class Shell(cmd.Cmd):
    """Every line is `grenadine-sv -c CONFIG LINE`; `help` lists the commands."""

    intro = "grenadine-sv ctl: type a command (help lists them), exit or ^D to leave"
    prompt = "grenadine-sv> "

    def __init__(self, config: str, stdout: TextIO = sys.stdout) -> None:
        super().__init__(stdout=stdout)
        self.config = config
        self.last_code = EXIT_OK

    def default(self, line: str) -> None:
        from grenadine_sv.cli.main import main

        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f"grenadine-sv: {exc}", file=sys.stderr)
            return
        if words and words[0] == "ctl":
            words = words[1:]
        if words:
            with contextlib.suppress(KeyboardInterrupt):
                self.last_code = main(["-c", self.config, *words])

    def do_exit(self, _: str) -> bool:
        return True

    def do_quit(self, _: str) -> bool:
        return True

    def do_EOF(self, _: str) -> bool:
        return True

    def emptyline(self) -> bool:
        return False

    def do_help(self, arg: str) -> None:
        from grenadine_sv.cli.main import main

        main(["-c", self.config, *shlex.split(arg), "--help"])

    def completenames(self, text: str, *ignored: object) -> list[str]:
        return [name for name in command_names() if name.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = line.split()
        if not words or words[0] not in PROGRAM_COMMANDS:
            return []
        return [name for name in [*self.program_names(), "all"] if name.startswith(text)]

    def program_names(self) -> list[str]:
        socket_path = control_socket_of(Path(self.config))
        if socket_path is None:
            return []
        try:
            entries = request(socket_path, "status", {}, timeout=2.0)
        except Exception:
            return []
        return [str(entry["name"]) for entry in entries]


def command_names() -> list[str]:
    from grenadine_sv.cli.main import build_parser

    parser = build_parser()
    names: list[str] = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            names.extend(action.choices)
    return sorted(set(names) - {"ctl", "run"} | {"exit"})
