"""Read a supervisord configuration (its [include] files too) and translate it into
grenadine-sv's tables: one [programs.NAME] table per process, and what could not be
translated, each with the reason. Nothing here writes files (cli/local.py does).

supervisord's own rules are followed: `;`/`#` comments after whitespace, `%(here)s` and
`%(ENV_X)s` everywhere, `%(program_name)s`, `%(process_num)d`, `%(group_name)s`,
`%(numprocs)d` and `%(host_node_name)s` in program values, `numprocs` processes named by
`process_name`, sizes with 1024-based KB/MB/GB, `environment` as KEY="value" pairs.
"""

from __future__ import annotations

import configparser
import glob
import itertools
import os
import re
import shlex
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grenadine_sv.config.units import PROGRAM_NAME_PATTERN

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
SIZE_UNITS = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
DEFAULT_PRIORITY = 999
LOG_KEYS = ("logfile", "logfile_maxbytes", "logfile_backups")

# Program keys grenadine-sv has no use for, and why.
PROGRAM_KEYS_NOT_TRANSLATED = {
    "redirect_stderr": "grenadine-sv keeps stderr in a file of its own (NAME.err.log); "
    "`grenadine-sv logs --stderr NAME` shows it",
    "stopasgroup": "not needed: the stop signal goes to the program's sandbox, and when its "
    "PID 1 ends every process of the sandbox ends",
    "killasgroup": "not needed: SIGKILL ends the sandbox's PID 1 and with it every process",
    "serverurl": "there is no XML-RPC server; commands use the control socket",
    "stdout_capture_maxbytes": "there are no process communication events",
    "stderr_capture_maxbytes": "there are no process communication events",
    "stdout_events_enabled": "there are no event listeners",
    "stderr_events_enabled": "there are no event listeners",
    "stdout_syslog": "output goes to files in log_dir; have syslog read them if needed",
    "stderr_syslog": "output goes to files in log_dir; have syslog read them if needed",
}
SECTIONS_NOT_TRANSLATED = {
    "eventlistener": "event listeners are not supported",
    "fcgi-program": "FastCGI programs (a socket shared by supervisord) are not supported",
    "group": "grenadine-sv has no groups: name several programs, or all, in a command",
    "inet_http_server": "there is no HTTP control server: the control socket is a Unix "
    "socket ([supervisor] control_socket, mode 0600)",
    "unix_http_server": "the control socket is [supervisor] control_socket (mode 0600); "
    "it speaks grenadine-sv's protocol, not XML-RPC",
    "supervisorctl": "grenadine-sv's own commands talk to the control socket",
    "rpcinterface": "there is no XML-RPC interface",
    "ctlplugin": "there are no supervisorctl plugins",
}
SUPERVISORD_KEYS = {
    "logfile": "the supervisor logs to stderr and to log_dir/grenadine-sv.log",
    "pidfile": "the pid file is state_dir/grenadine-sv.pid",
}


@dataclass(frozen=True)
class Untranslated:
    """Something of the supervisord configuration that has no equivalent here."""

    file: Path
    section: str
    key: str | None
    reason: str

    def render(self) -> str:
        where = f"[{self.section}]" + (f" {self.key}" if self.key else "")
        return f"{self.file}: {where}: {self.reason}"


@dataclass
class Imported:
    """A supervisord configuration translated: tables ready to be written as TOML."""

    files: list[Path] = field(default_factory=list)
    supervisor: dict[str, Any] = field(default_factory=dict)
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each program's section and file, for messages.
    origins: dict[str, tuple[Path, str]] = field(default_factory=dict)
    untranslated: list[Untranslated] = field(default_factory=list)


class SupervisordConfigError(Exception):
    """The supervisord configuration cannot be read at all."""


def import_supervisord(path: Path, environ: Mapping[str, str] | None = None) -> Imported:
    """Translate the supervisord configuration at `path` and the files it includes."""
    env = dict(os.environ if environ is None else environ)
    imported = Imported()
    sections = list(_read_with_includes(path.resolve(), env, imported))
    group_of = _groups(sections)
    priorities: dict[str, int] = {}
    for file, name, values in sections:
        kind, _, rest = name.partition(":")
        if kind == "program" and rest:
            group = group_of.get(rest, rest)
            _translate_program(file, rest, values, group=group, env=env, imported=imported)
            for process in _process_names(file, rest, values, group_of.get(rest, rest), env):
                priorities[process] = _int(values.get("priority"), DEFAULT_PRIORITY)
        elif kind == "supervisord":
            _translate_supervisord(file, values, env, imported)
        elif kind == "include":
            continue
        elif kind in SECTIONS_NOT_TRANSLATED:
            imported.untranslated.append(
                Untranslated(file, name, None, SECTIONS_NOT_TRANSLATED[kind])
            )
        else:
            imported.untranslated.append(Untranslated(file, name, None, "unknown section"))
    _order_by_priority(imported, priorities)
    return imported


# reading ------------------------------------------------------------------------------


def _parser() -> configparser.RawConfigParser:
    return configparser.RawConfigParser(
        inline_comment_prefixes=(";", "#"), strict=False, interpolation=None
    )


def _read_with_includes(
    path: Path, env: Mapping[str, str], imported: Imported
) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """(file, section name, raw values) of the main file, then of each included file
    (sorted, as supervisord reads them; included files include nothing further)."""
    parser = _read_file(path)
    imported.files.append(path)
    yield from _sections(path, parser)
    if not parser.has_section("include"):
        return
    files = parser.get("include", "files", fallback="")
    expansions = _file_expansions(path, env)
    for pattern in _expand(files, expansions).split():
        matches = sorted(glob.glob(str(path.parent / pattern)))
        if not matches:
            imported.untranslated.append(
                Untranslated(path, "include", "files", f'"{pattern}" matches no file')
            )
        for match in matches:
            included = Path(match).resolve()
            if included in imported.files:
                continue
            imported.files.append(included)
            yield from _sections(included, _read_file(included))


def _read_file(path: Path) -> configparser.RawConfigParser:
    parser = _parser()
    try:
        with path.open(encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SupervisordConfigError(f"{path}: cannot be read: {exc}") from exc
    return parser


def _sections(
    path: Path, parser: configparser.RawConfigParser
) -> Iterator[tuple[Path, str, dict[str, str]]]:
    for name in parser.sections():
        yield path, name, dict(parser.items(name))


def _file_expansions(path: Path, env: Mapping[str, str]) -> dict[str, str]:
    return {"here": str(path.parent), **{f"ENV_{key}": value for key, value in env.items()}}


def _expand(value: str, expansions: Mapping[str, Any]) -> str:
    """supervisord's expansion: Python %-formatting with named values; `%%` is `%`."""
    return value % expansions


# programs -----------------------------------------------------------------------------


def _groups(sections: list[tuple[Path, str, dict[str, str]]]) -> dict[str, str]:
    """program name -> the [group:x] that lists it (its %(group_name)s)."""
    group_of: dict[str, str] = {}
    for _, name, values in sections:
        if name.startswith("group:"):
            for program in values.get("programs", "").replace(",", " ").split():
                group_of[program] = name.removeprefix("group:")
    return group_of


def _program_expansions(
    program: str, group: str, numprocs: int, env: Mapping[str, str], file: Path
) -> dict[str, Any]:
    return {
        **_file_expansions(file, env),
        "program_name": program,
        "group_name": group,
        "numprocs": numprocs,
        "host_node_name": socket.gethostname(),
    }


def _process_names(
    file: Path, program: str, values: Mapping[str, str], group: str, env: Mapping[str, str]
) -> list[str]:
    numprocs = _int(values.get("numprocs"), 1)
    start = _int(values.get("numprocs_start"), 0)
    expansions = _program_expansions(program, group, numprocs, env, file)
    pattern = values.get("process_name", "%(program_name)s")
    names = []
    for number in range(start, start + numprocs):
        try:
            names.append(_expand(pattern, expansions | {"process_num": number}))
        except (KeyError, ValueError, TypeError):
            names.append(f"{program}_{number:02d}")
    return names


def _translate_program(
    file: Path,
    program: str,
    values: Mapping[str, str],
    *,
    group: str,
    env: Mapping[str, str],
    imported: Imported,
) -> None:
    section = f"program:{program}"

    def skip(key: str | None, reason: str) -> None:
        imported.untranslated.append(Untranslated(file, section, key, reason))

    if "command" not in values:
        skip("command", "a program needs a command; not imported")
        return
    numprocs = _int(values.get("numprocs"), 1)
    if numprocs > 1 and "%(process_num)" not in values.get("process_name", ""):
        skip("process_name", "numprocs > 1 needs %(process_num) in process_name; not imported")
        return
    base = _program_expansions(program, group, numprocs, env, file)
    names = _process_names(file, program, values, group, env)
    start = _int(values.get("numprocs_start"), 0)
    for number, name in zip(range(start, start + numprocs), names, strict=True):
        if not re.fullmatch(PROGRAM_NAME_PATTERN, name):
            skip(None, f'"{name}" is not a valid program name here ({PROGRAM_NAME_PATTERN})')
            continue
        expansions = base | {"process_num": number}
        try:
            table = _program_table(values, expansions, skip)
        except (KeyError, ValueError, TypeError) as exc:
            skip(None, f"cannot expand its values ({exc!r}); not imported")
            continue
        imported.programs[name] = table
        imported.origins[name] = (file, section)
    for key in values:
        if key in PROGRAM_KEYS_NOT_TRANSLATED:
            skip(key, PROGRAM_KEYS_NOT_TRANSLATED[key])
        elif key not in TRANSLATED_PROGRAM_KEYS:
            skip(key, "no equivalent in grenadine-sv")


def _program_table(
    values: Mapping[str, str],
    expansions: Mapping[str, Any],
    skip: Callable[[str, str], None],
) -> dict[str, Any]:
    def get(key: str) -> str | None:
        value = values.get(key)
        return None if value is None else _expand(value, expansions).strip()

    table: dict[str, Any] = {"command": get("command")}
    if (directory := get("directory")) is not None:
        table["directory"] = directory
    if (environment := get("environment")) is not None:
        table["environment"] = parse_environment(environment)
    if (umask := get("umask")) is not None:
        table["umask"] = umask.zfill(3)
    if (user := get("user")) is not None:
        table["user"] = user
    if (autostart := get("autostart")) is not None:
        table["autostart"] = _bool(autostart)
    if (autorestart := get("autorestart")) is not None:
        table["autorestart"] = _autorestart(autorestart)
    if (exitcodes := get("exitcodes")) is not None:
        table["exitcodes"] = [int(code) for code in exitcodes.replace(" ", "").split(",") if code]
    for key in ("startsecs", "startretries", "stopwaitsecs"):
        if (number := get(key)) is not None:
            table[key] = int(number)
    if (stopsignal := get("stopsignal")) is not None:
        table["stopsignal"] = stopsignal.upper().removeprefix("SIG")
    for stream in ("stdout", "stderr"):
        _log_keys(stream, get, table, skip)
    redirected = _bool(get("redirect_stderr") or "false")
    shared = table.get("stderr_logfile") is not None and (
        table.get("stderr_logfile") == table.get("stdout_logfile")
    )
    if redirected or shared:
        for key in [k for k in table if k.startswith("stderr_logfile")]:
            del table[key]
        if shared and not redirected:
            skip(
                "stderr_logfile",
                "the same file as stdout_logfile: grenadine-sv keeps "
                "stderr in a file of its own (NAME.err.log in log_dir)",
            )
    return table


def _log_keys(
    stream: str,
    get: Callable[[str], str | None],
    table: dict[str, Any],
    skip: Callable[[str, str], None],
) -> None:
    logfile = get(f"{stream}_logfile")
    if logfile is not None:
        lowered = logfile.lower()
        if lowered == "auto":
            pass  # ours: log_dir/NAME.out.log or NAME.err.log
        elif lowered in ("none", "off"):
            skip(f"{stream}_logfile", "output is always captured (in log_dir by default)")
        elif lowered == "syslog" or logfile.startswith("/dev/"):
            skip(f"{stream}_logfile", f"{logfile}: output goes to a file; kept in log_dir")
        else:
            table[f"{stream}_logfile"] = logfile
    if (maxbytes := get(f"{stream}_logfile_maxbytes")) is not None:
        table[f"{stream}_logfile_maxbytes"] = parse_size(maxbytes)
    if (backups := get(f"{stream}_logfile_backups")) is not None:
        table[f"{stream}_logfile_backups"] = int(backups)


TRANSLATED_PROGRAM_KEYS = frozenset(
    {
        "command",
        "directory",
        "environment",
        "umask",
        "user",
        "autostart",
        "autorestart",
        "exitcodes",
        "startsecs",
        "startretries",
        "stopwaitsecs",
        "stopsignal",
        "priority",
        "numprocs",
        "numprocs_start",
        "process_name",
        *(f"{stream}_{key}" for stream in ("stdout", "stderr") for key in LOG_KEYS),
    }
)


def _order_by_priority(imported: Imported, priorities: Mapping[str, int]) -> None:
    """supervisord starts lower priorities first: each program depends on the programs of
    the next lower priority (starting after they are ready), and ignores their stops, as
    supervisord does."""
    known = {name: priorities.get(name, DEFAULT_PRIORITY) for name in imported.programs}
    levels = sorted(set(known.values()))
    for below, level in itertools.pairwise(levels):
        earlier = sorted(name for name, priority in known.items() if priority == below)
        for name, priority in known.items():
            if priority == level:
                imported.programs[name]["depends_on"] = earlier
                imported.programs[name]["on_dependency_stop"] = "ignore"


# [supervisord] --------------------------------------------------------------------------


def _translate_supervisord(
    file: Path, values: Mapping[str, str], env: Mapping[str, str], imported: Imported
) -> None:
    for key, value in values.items():
        if key == "childlogdir":
            try:
                imported.supervisor["log_dir"] = _expand(value, _file_expansions(file, env))
            except (KeyError, ValueError, TypeError) as exc:
                imported.untranslated.append(
                    Untranslated(file, "supervisord", key, f"cannot expand it ({exc!r})")
                )
        elif key in SUPERVISORD_KEYS:
            imported.untranslated.append(
                Untranslated(file, "supervisord", key, SUPERVISORD_KEYS[key])
            )
        else:
            imported.untranslated.append(
                Untranslated(file, "supervisord", key, "no equivalent in grenadine-sv")
            )


# values -------------------------------------------------------------------------------


def parse_environment(value: str) -> dict[str, str]:
    """supervisord's KEY="value",KEY2=value2 (datatypes.dict_of_key_value_pairs)."""
    lexer = shlex.shlex(value)
    lexer.wordchars += "/.+-():"
    tokens = list(lexer)
    pairs: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        key_equals_value = tokens[index : index + 3]
        if len(key_equals_value) != 3 or key_equals_value[1] != "=":
            raise ValueError(f"unexpected end of key/value pairs in {value!r}")
        pairs[key_equals_value[0]] = key_equals_value[2].strip("'\"")
        index += 4
    return pairs


def parse_size(value: str) -> int:
    """supervisord's byte_size: a number with an optional KB, MB or GB (powers of 1024)."""
    text = value.strip().lower()
    for suffix, factor in SIZE_UNITS.items():
        if text.endswith(suffix):
            return int(float(text.removesuffix(suffix)) * factor)
    return int(text)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is not a boolean")


def _autorestart(value: str) -> str:
    lowered = value.strip().lower()
    if lowered == "unexpected":
        return "on-failure"
    return "always" if _bool(lowered) else "never"


def _int(value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value.strip())
    except ValueError:
        return default
