"""The grenadine-sv command: argument parsing and dispatch to a command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from grenadine_sv import __version__
from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from grenadine_sv.cli.remote import remote

# Commands done by this process; the others are requests to the running supervisor.
LOCAL_COMMANDS = frozenset(
    {"run", "check", "doctor", "schema", "logs", "images", "export", "import"}
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grenadine-sv",
        description="Supervise daemons in namespace sandboxes; "
        "checkpoint and restore them with CRIU.",
    )
    parser.add_argument("-c", "--config", type=Path, help="configuration file (TOML)")
    parser.add_argument("--version", action="version", version=f"grenadine-sv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, *, json_output: bool = False) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        if json_output:
            command.add_argument("--json", action="store_true", help="print JSON for scripts")
        return command

    add("run", "run the supervisor in the foreground (the default)")
    add("status", "one line per program", json_output=True).add_argument("names", nargs="*")
    for verb in ("start", "stop", "restart"):
        add(verb, f"{verb} programs (or all)", json_output=True).add_argument("names", nargs="+")
    add("reload", "re-read the configuration and apply the difference", json_output=True)
    logs = add("logs", "show a program's captured output")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    logs.add_argument("-n", "--bytes", type=int, default=4096, help="bytes from the end to show")
    add("check", "validate the configuration and exit (0 valid, 2 invalid)")
    add("doctor", "report what CRIU needs on this host and what will not work", json_output=True)
    add("schema", "print the JSON Schema of the configuration")
    add_checkpoint_commands(add)
    add_transfer_commands(add)
    return parser


def add_checkpoint_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    checkpoint = add("checkpoint", "checkpoint programs now", json_output=True)
    checkpoint.add_argument("names", nargs="+")
    checkpoint.add_argument("--stop", action="store_true", help="stop the program after the dump")
    restore = add("restore", "restore a program from an image", json_output=True)
    restore.add_argument("name")
    restore.add_argument(
        "image",
        help="image id, unique id prefix, IDX from `images`, or latest; "
        "remote:ID or remote:latest for the object store's",
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
        "--remote", action="store_true", help="the object store's images ([supervisor.remote])"
    )
    prune = add("prune", "delete old images", json_output=True)
    prune.add_argument("name", nargs="?")
    prune.add_argument("--keep", type=int, help="images to keep per program (default: its keep)")


def add_transfer_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    command = args.command or "run"
    out = sys.stdout
    try:
        return dispatch(command, args, out)
    except KeyboardInterrupt:
        return EXIT_FAILED


def dispatch(command: str, args: argparse.Namespace, out: TextIO) -> int:
    if command not in LOCAL_COMMANDS:
        return remote(args, out)
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
        "export": transfer.export,
        "import": transfer.import_archive,
    }
    return handlers[command](args, out)


if __name__ == "__main__":
    raise SystemExit(main())
