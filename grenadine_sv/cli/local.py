"""The commands this process does itself (run, check, doctor, schema, logs, images);
each returns an exit code. They load the configuration models, so the command line
imports this module only for them."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TextIO

from grenadine_sv.cli.config_path import config_path_of
from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from grenadine_sv.cli.formatting import format_images, format_remote_images, print_json
from grenadine_sv.config.loading import Config, ConfigError, config_json_schema, load_config
from grenadine_sv.control.protocol import ControlError


def load_or_explain(args: argparse.Namespace) -> Config | None:
    """The validated configuration, or None after printing why it is not valid."""

    path = config_path_of(args)
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"grenadine-sv: invalid configuration, nothing started:\n{exc}", file=sys.stderr)
        return None


def log_to_stderr() -> None:
    """Warnings the library logs while a local command works (an image skipped, say) go to
    stderr, never into the data it prints."""
    from grenadine_sv.logs import configure_logging

    configure_logging("auto", "warning")


def run(args: argparse.Namespace, out: TextIO) -> int:
    import trio

    from grenadine_sv.logs import configure_logging
    from grenadine_sv.sandbox.linux import set_process_name
    from grenadine_sv.supervisor.build import build_supervisor
    from grenadine_sv.supervisor.core import StartupError

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
    config = load_or_explain(args)
    if config is None:
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
    print_json(config_json_schema(), out)
    return EXIT_OK


def logs(args: argparse.Namespace, out: TextIO) -> int:
    import trio

    from grenadine_sv.supervisor.output import follow

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
            size = log_file.seek(0, 2)
            log_file.seek(max(size - args.bytes, 0))
            sys.stdout.buffer.write(log_file.read())
        return EXIT_OK

    async def stream() -> None:
        async with contextlib.aclosing(follow(path, args.bytes)) as chunks:
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
    if args.remote:
        return remote_images(config, args, out)
    store = ImageStore(config.supervisor.state_dir)
    listed = store.list(args.name)
    if args.json:
        print_json([image.model_dump(mode="json") for image in listed], out)
    else:
        out.write(format_images(listed))
    return EXIT_OK


def remote_images(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """`images --remote`: what the object store holds (boto3 is imported here only)."""
    from dataclasses import asdict

    from grenadine_sv.store.remote import RemoteSettingsLike, RemoteStore, RemoteStoreError

    settings = config.supervisor.remote
    if settings is None or settings.url is None:
        print("grenadine-sv: images --remote needs [supervisor.remote] url", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = RemoteStore(
            RemoteSettingsLike(
                settings.url, settings.endpoint, settings.region, settings.credentials_file
            )
        )
        names = [args.name] if args.name else store.programs()
        listed = [asdict(image) for name in names for image in store.list(name)]
    except RemoteStoreError as exc:
        print(f"grenadine-sv: images --remote failed: {exc}", file=sys.stderr)
        return EXIT_USAGE if "credentials_file" in str(exc) else EXIT_FAILED
    if args.json:
        print_json(listed, out)
    else:
        out.write(format_remote_images(listed))
    return EXIT_OK
