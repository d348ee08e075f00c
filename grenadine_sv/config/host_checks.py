"""What a valid configuration may still get wrong on this host: `check` warns about each (the
supervisor may be started on another host, so they are not errors unless --strict)."""

from __future__ import annotations

import glob
import grp
import os
import pwd
import shutil
from collections.abc import Callable, Iterator

from grenadine_sv.config.errors import key_path
from grenadine_sv.config.loading import Config, ProgramConfig

# Why a pinned image reference (program, ref) names no image in the store, or None.
ImageProblem = Callable[[str, str], str | None]


def host_warnings(config: Config, image_problem: ImageProblem | None = None) -> list[str]:
    """One sentence per problem, naming the file and the key."""
    warnings = list(_include_warnings(config))
    for program in config.programs.values():
        warnings.extend(_program_warnings(program, image_problem))
    return warnings


def _include_warnings(config: Config) -> Iterator[str]:
    base = glob.escape(str(config.path.parent))
    for index, pattern in enumerate(config.supervisor.include):
        if not glob.glob(os.path.join(base, pattern), recursive=True):
            key = key_path(["supervisor", "include"]) + f"[{index}]"
            yield f'{config.path}: {key}: "{pattern}" matches no file'


def _program_warnings(program: ProgramConfig, image_problem: ImageProblem | None) -> Iterator[str]:
    def where(key: str) -> str:
        return f"{program.source}: {key_path(['programs', program.name, key])}"

    executable = program.command[0]
    if "/" in executable:
        path = executable if os.path.isabs(executable) else str(program.directory / executable)
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            yield f'{where("command")}: "{executable}" is not an executable file on this host'
    elif shutil.which(executable) is None:
        yield f'{where("command")}: "{executable}" is not found in PATH on this host'
    if not program.directory.is_dir():
        yield f'{where("directory")}: "{program.directory}" is not a directory on this host'
    if program.user is not None and not _user_exists(program.user):
        yield f'{where("user")}: no user "{program.user}" on this host'
    if program.group is not None and not _group_exists(program.group):
        yield f'{where("group")}: no group "{program.group}" on this host'
    pinned = program.restore
    if image_problem is not None and pinned is not None and pinned.strip().lower() != "latest":
        problem = image_problem(program.name, pinned)
        if problem is not None:
            yield f"{where('restore')}: {problem}"


def _user_exists(user: str) -> bool:
    try:
        if user.isdigit():
            pwd.getpwuid(int(user))
        else:
            pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_exists(group: str) -> bool:
    try:
        if group.isdigit():
            grp.getgrgid(int(group))
        else:
            grp.getgrnam(group)
    except KeyError:
        return False
    return True
