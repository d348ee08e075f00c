"""The commands this process does itself (run, check, doctor, schema, logs, images);
each returns an exit code. They load the configuration models, so the command line
imports this module only for them."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import TextIO

from grenadine_sv.cli.config_path import config_path_of
from grenadine_sv.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from grenadine_sv.cli.formatting import format_images, format_remote_images, print_json
from grenadine_sv.config.loading import Config, ConfigError, config_json_schema, load_config
from grenadine_sv.control.protocol import ControlError


def load_or_explain(args: argparse.Namespace) -> Config | None:
    """The validated configuration, or None after printing why it is not valid."""

    path = Path(config_path_of(args))
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
    # structlog imports `rich` wherever it is installed, for tracebacks the supervisor never
    # renders with it (logs.py chooses the renderers): 3.5 MiB and tens of ms at start-up.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    import trio

    from grenadine_sv.logs import SUPERVISOR_LOG_FILE, configure_logging
    from grenadine_sv.sandbox.linux import set_process_name
    from grenadine_sv.supervisor.build import build_supervisor
    from grenadine_sv.supervisor.core import StartupError

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    configure_logging(
        config.supervisor.log_format,
        config.supervisor.log_level,
        also_to=config.supervisor.log_dir / SUPERVISOR_LOG_FILE,
    )
    settle_heap()
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


def settle_heap() -> None:
    """Move what start-up allocated (modules, classes, the configuration: long-lived) out of the
    collector's reach, then let it run: each full collection would otherwise walk all of it
    again (tens of ms, while programs start and checkpoints run)."""
    gc.freeze()
    gc.enable()


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
    warnings = warn_about_host(config, check_pinned_images=True)
    if warnings and args.strict:
        print(f"grenadine-sv: {warnings} warnings, and --strict", file=sys.stderr)
        return EXIT_USAGE
    files = ", ".join(str(f) for f in config.files)
    out.write(f"configuration valid: {len(config.programs)} programs from {files}\n")
    return EXIT_OK


def warn_about_host(config: Config, *, check_pinned_images: bool = False) -> int:
    """Print, on stderr, one warning per thing the configuration names that this host lacks
    or cannot do (each naming file and key); returns how many."""
    from grenadine_sv.config.host_checks import host_warnings
    from grenadine_sv.host.warnings import host_capabilities, init_present, program_warnings

    image_problem = partial(pinned_image_problem, config.supervisor.state_dir)
    warnings = host_warnings(config, image_problem if check_pinned_images else None)
    warnings += program_warnings(config.programs, host_capabilities(), init_present())
    for warning in warnings:
        print(f"grenadine-sv: warning: {warning}", file=sys.stderr)
    return len(warnings)


def pinned_image_problem(state_dir: Path, program: str, ref: str) -> str | None:
    """Why `ref` names no image of `program` in the store under `state_dir`, or None."""
    from grenadine_sv.store.images import ImageStore

    store = ImageStore(state_dir)
    try:
        store.resolve(program, ref)
    except (LookupError, ValueError) as exc:
        return f"{exc} (in {store.root})"
    except OSError as exc:
        return f"cannot read the images in {store.root}: {exc}"
    return None


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


def maintail(args: argparse.Namespace, out: TextIO) -> int:
    """The supervisor's own log, as it writes it to log_dir (supervisorctl's `maintail`)."""
    from grenadine_sv.cli.tailing import start_of_last_lines
    from grenadine_sv.logs import SUPERVISOR_LOG_FILE

    config = load_or_explain(args)
    if config is None:
        return EXIT_USAGE
    path = config.supervisor.log_dir / SUPERVISOR_LOG_FILE
    if args.follow:
        return follow_log(path, args.lines)
    if not path.exists():
        print(f"grenadine-sv: no supervisor log at {path} yet", file=sys.stderr)
        return EXIT_OK
    with path.open("rb") as log_file:
        log_file.seek(start_of_last_lines(log_file, args.lines))
        shutil.copyfileobj(log_file, sys.stdout.buffer)
    return EXIT_OK


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
    if args.remote:
        return remote_images(config, args, out)
    store = ImageStore(config.supervisor.state_dir)
    listed = store.list(args.name)
    if args.name is not None and args.name not in config.programs and not listed:
        print(f"grenadine-sv: no such program: {args.name}", file=sys.stderr)
        return EXIT_USAGE
    removed = sorted({i.program for i in listed if i.program not in config.programs})
    if args.name is None and not args.all:
        listed = [image for image in listed if image.program in config.programs]
    corrupt = {image.id: store.corruption(image) for image in listed}
    if args.json:
        print_json(
            [
                image.model_dump(mode="json")
                | {"corrupt": corrupt[image.id], "configured": image.program in config.programs}
                for image in listed
            ],
            out,
        )
        return EXIT_OK
    out.write(format_images(listed, corrupt))
    if removed and args.name is None and not args.all:
        names = ", ".join(removed)
        print(
            f"(images of programs no longer configured, {names}: see images --all; "
            "prune NAME deletes them)",
            file=sys.stderr,
        )
    return EXIT_OK


def import_supervisord(args: argparse.Namespace, out: TextIO) -> int:
    """Write grenadine.toml and conf.d/NAME.toml from a supervisord configuration, check the
    result as `check` would, and list what could not be translated and why."""
    import tomli_w

    from grenadine_sv.config.supervisord import SupervisordConfigError, import_supervisord

    try:
        imported = import_supervisord(Path(args.file))
    except SupervisordConfigError as exc:
        print(f"grenadine-sv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    output = Path(args.output)
    main_file = output / "grenadine.toml"
    conf_d = output / "conf.d"
    targets = [main_file, *(conf_d / f"{name}.toml" for name in imported.programs)]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not args.force:
        print(
            f"grenadine-sv: would overwrite {', '.join(existing)}; nothing written "
            "(--force overwrites)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    conf_d.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(str(file) for file in imported.files)
    main_file.write_text(
        f"# Imported from {sources} by grenadine-sv import-supervisord.\n"
        + tomli_w.dumps({"supervisor": {**imported.supervisor, "include": ["conf.d/*.toml"]}})
    )
    for name, table in imported.programs.items():
        file, section = imported.origins[name]
        (conf_d / f"{name}.toml").write_text(
            f"# [{section}] of {file}\n" + tomli_w.dumps({"programs": {name: table}})
        )
    out.write(f"wrote {main_file} and {len(imported.programs)} programs in {conf_d}/\n")
    for item in imported.untranslated:
        out.write(f"not translated: {item.render()}\n")
    try:
        config = load_config(main_file)
    except ConfigError as exc:
        print(f"grenadine-sv: the result does not pass check:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    warn_about_host(config)
    out.write(f"check: configuration valid: {len(config.programs)} programs\n")
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
