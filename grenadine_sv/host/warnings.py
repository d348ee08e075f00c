"""Warnings about programs that this host cannot run or checkpoint as configured (`check`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from grenadine_sv.config.models import ProgramConfig
from grenadine_sv.criu.version import UnreadableOutputError
from grenadine_sv.host.facts import decode_capabilities, parse_cap_eff
from grenadine_sv.sandbox.init import TINI
from grenadine_sv.sandbox.mounts import DEFAULT_PATH
from grenadine_sv.sandbox.visibility import hidden_from_sandbox, host_mount_points

ROOT_NAMES = frozenset({"root", "0"})


def host_capabilities() -> set[str]:
    """This process's effective capabilities (empty when they cannot be read)."""
    try:
        return decode_capabilities(parse_cap_eff(Path("/proc/self/status").read_text()))
    except (OSError, UnreadableOutputError):
        return set()


def program_warnings(
    programs: Mapping[str, ProgramConfig],
    capabilities: Iterable[str],
    init_present: bool,
    host_mounts: Sequence[str] | None = None,
) -> list[str]:
    """One sentence per program setting that will not work on this host, naming file and key.

    `host_mounts`: the host's mount points (default: this host's)."""
    has_sys_resource = "CAP_SYS_RESOURCE" in set(capabilities)
    if host_mounts is None:
        host_mounts = host_mount_points()
    warnings = []
    for name, program in sorted(programs.items()):
        where = f"{program.source}: programs.{name}"
        if program.user is not None and program.user not in ROOT_NAMES and not has_sys_resource:
            warnings.append(
                f"{where}.user: {program.user!r} cannot be checkpointed here: CRIU needs"
                " CAP_SYS_RESOURCE for another user's processes (\"Can't get rlimit\"), which"
                " this host lacks; run the program as root or grant CAP_SYS_RESOURCE"
            )
        if program.init and not init_present:
            warnings.append(
                f"{where}.init: {TINI} is missing, so the program cannot start:"
                " apt-get install tini, or set init = false"
            )
        search_path = program.environment.get("PATH", os.environ.get("PATH", DEFAULT_PATH))
        hidden = hidden_from_sandbox(
            name,
            command=program.command[0],
            directory=str(program.directory),
            search_path=search_path,
            binds=[str(bind) for bind in program.binds],
            host_mounts=host_mounts,
        )
        if hidden is not None:
            warnings.append(f"{program.source}: {hidden}")
    return warnings


def init_present() -> bool:
    return os.access(TINI, os.X_OK)
