"""The configuration: load the TOML files, validate them, and report every problem at once.

load_config(path) returns a Config or raises ConfigError, whose message has one line per
problem, each naming the file and the key.
"""

import glob
import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from grenadine_sv.config.checks import program_problems, remote_problems, start_order
from grenadine_sv.config.errors import (
    ConfigError,
    Problem,
    key_path,
    problems_from_validation_error,
)
from grenadine_sv.config.field_docs import attribute_docstrings
from grenadine_sv.config.models import (
    DIGEST_FIELDS,
    LOADER_FIELDS,
    CheckpointPolicy,
    MetricsSettings,
    ProgramConfig,
    ReadyProbe,
    SupervisorSettings,
)
from grenadine_sv.config.units import PROGRAM_NAME_PATTERN

__all__ = [
    "DIGEST_FIELDS",
    "CheckpointPolicy",
    "Config",
    "ConfigError",
    "MetricsSettings",
    "ProgramConfig",
    "ReadyProbe",
    "SupervisorSettings",
    "config_json_schema",
    "load_config",
]

PathDisplay = Callable[[Path], str]
Document = TypeVar("Document", bound=BaseModel)
_TOML_ERROR_POSITION = re.compile(r"(.*) \(at (line \d+, column \d+|end of document)\)", re.DOTALL)


class Config(BaseModel):
    """A whole, valid configuration: the main file and every file it includes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    """the main file, absolute"""
    files: list[Path]
    """every file read: the main file, then the included files in sorted order"""
    supervisor: SupervisorSettings
    programs: dict[str, ProgramConfig]

    @model_validator(mode="after")
    def _programs_fit_together(self) -> Self:
        problems = program_problems(self.programs, self.supervisor.log_dir)
        if problems:
            raise ValueError("\n".join(problem.render() for problem in problems))
        return self

    def start_order(self) -> list[str]:
        """Program names, each after the programs it depends on; ties broken by name."""
        return start_order(self.programs)


class _MainFile(BaseModel):
    """The main configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="grenadine-sv configuration")

    supervisor: SupervisorSettings = SupervisorSettings()
    programs: dict[str, ProgramConfig] = {}


class _IncludedFile(BaseModel):
    """A file named by supervisor.include: programs only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    programs: dict[str, ProgramConfig] = {}


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the main file and its includes; raise ConfigError listing every
    problem found, each naming its file and key."""
    main = Path(os.path.abspath(path))
    display = _path_display(main, os.fspath(path))
    problems: list[Problem] = []
    raw_main = _read_toml(main, problems)
    if raw_main is None:
        raise _config_error(problems, display)
    main_doc = _validate(_MainFile, raw_main, main, problems)
    defined_in = _program_files(raw_main, main, {}, problems, display)
    include = main_doc.supervisor.include if main_doc else _raw_include(raw_main)
    included_docs: list[_IncludedFile] = []
    files = [main, *_expand_includes(include, main, problems)]
    for file in files[1:]:
        raw = _read_toml(file, problems)
        if raw is None:
            continue
        if "supervisor" in raw:
            problems.append(
                Problem(
                    file,
                    "supervisor",
                    f"expected only [programs.*] tables in an included file, got [supervisor]"
                    f" (it belongs in {display(main)})",
                )
            )
            raw = {key: value for key, value in raw.items() if key != "supervisor"}
        included_doc = _validate(_IncludedFile, raw, file, problems)
        defined_in = _program_files(raw, file, defined_in, problems, display)
        if included_doc is not None:
            included_docs.append(included_doc)
    if problems or main_doc is None:
        raise _config_error(problems, display)
    programs = dict(main_doc.programs)
    for included_doc in included_docs:
        programs.update(included_doc.programs)
    problems.extend(program_problems(programs, main_doc.supervisor.log_dir, display))
    problems.extend(remote_problems(programs, main_doc.supervisor.remote))
    if problems:
        raise _config_error(problems, display)
    return Config(path=main, files=files, supervisor=main_doc.supervisor, programs=programs)


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of the main TOML file (for editors)."""
    schema = _MainFile.model_json_schema(schema_generator=_TomlJsonSchema)
    schema["properties"]["programs"]["propertyNames"] = {"pattern": f"^{PROGRAM_NAME_PATTERN}$"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


class _TomlJsonSchema(GenerateJsonSchema):
    """TOML has no null: an optional key is one that may be left out. Each key is described
    by the docstring under its field."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        properties = json_schema.get("properties", {})
        for field, doc in attribute_docstrings(schema["cls"]).items():
            if field in properties:
                properties[field]["description"] = doc
        return json_schema

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        # A nested table's keys carry their own defaults.
        if json_schema.get("default") is None or "$ref" in json_schema:
            json_schema.pop("default", None)
        return json_schema


def _path_display(main: Path, as_given: str) -> PathDisplay:
    """How files are named in messages: the main file as given on the command line, the
    others relative to the current directory when the main file was given relative."""
    cwd = os.getcwd()

    def display(file: Path) -> str:
        if file == main:
            return as_given
        return str(file) if os.path.isabs(as_given) else os.path.relpath(file, cwd)

    return display


def _config_error(problems: list[Problem], display: PathDisplay) -> ConfigError:
    return ConfigError([problem.render(display) for problem in problems])


def _read_toml(file: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        with file.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        problems.append(Problem(file, "", "no such configuration file"))
    except OSError as err:
        problems.append(Problem(file, "", f"cannot read the file ({err.strerror or err})"))
    except UnicodeDecodeError:
        problems.append(Problem(file, "", "expected UTF-8 text, got bytes that are not"))
    except tomllib.TOMLDecodeError as err:
        match = _TOML_ERROR_POSITION.fullmatch(str(err))
        message, position = match.groups() if match else (str(err), "")
        problems.append(Problem(file, position, f"invalid TOML: {message}"))
    return None


def _validate(
    model: type[Document], raw: dict[str, Any], file: Path, problems: list[Problem]
) -> Document | None:
    prepared = dict(raw)
    tables = raw.get("programs")
    if isinstance(tables, dict):
        prepared["programs"] = {
            name: _program_input(name, table, file, problems) for name, table in tables.items()
        }
    try:
        return model.model_validate(prepared, context={"base_dir": file.parent})
    except ValidationError as err:
        problems.extend(problems_from_validation_error(err, file, model))
        return None


def _program_input(name: str, table: object, file: Path, problems: list[Problem]) -> object:
    """A program's table with the keys the loader sets (name, source), which users may not."""
    if not isinstance(table, dict):
        return table
    for key in sorted(LOADER_FIELDS & table.keys()):
        problems.append(Problem(file, key_path(["programs", name, key]), "unknown key"))
    user_table = {key: value for key, value in table.items() if key not in LOADER_FIELDS}
    return {**user_table, "name": name, "source": file}


def _program_files(
    raw: dict[str, Any],
    file: Path,
    defined_in: dict[str, Path],
    problems: list[Problem],
    display: PathDisplay,
) -> dict[str, Path]:
    """defined_in extended with the programs of `file`; a program seen before is a problem."""
    tables = raw.get("programs")
    if not isinstance(tables, dict):
        return defined_in
    extended = dict(defined_in)
    for name in tables:
        if name in extended:
            problems.append(
                Problem(
                    file,
                    key_path(["programs", name]),
                    f'program "{name}" is already defined in {display(extended[name])}',
                )
            )
        else:
            extended[name] = file
    return extended


def _raw_include(raw: dict[str, Any]) -> list[str]:
    """The include globs of a main file that failed validation, if they are usable."""
    supervisor = raw.get("supervisor")
    include = supervisor.get("include") if isinstance(supervisor, dict) else None
    if isinstance(include, list) and all(
        isinstance(glob, str) and glob and "\0" not in glob for glob in include
    ):
        return include
    return []


def _expand_includes(patterns: list[str], main: Path, problems: list[Problem]) -> list[Path]:
    """The files matched by the include globs, relative to the main file's directory, each
    once. A match that is not a regular file (a device, a FIFO) and a path through a symlink
    loop are problems, each named once; directories are not files to include."""
    base = glob.escape(str(main.parent))
    found: dict[str, Path] = {}
    loops: set[tuple[Path, Path]] = set()
    refused: set[Path] = set()
    for pattern in patterns:
        for match in glob.glob(os.path.join(base, pattern), recursive=True):
            file = Path(os.path.abspath(match))
            loop = _symlink_loop(file)
            if loop is not None:
                loops.add(loop)
                continue
            try:
                mode = file.stat().st_mode
            except OSError:
                continue  # a dangling link: nothing to read
            if file == main or stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                if file not in refused:
                    refused.add(file)
                    problems.append(
                        Problem(
                            main,
                            "supervisor.include",
                            f"{file} (matched by {pattern!r}) is {_file_kind(mode)}, not a "
                            "regular file: only configuration files can be included",
                        )
                    )
                continue
            found.setdefault(os.path.realpath(file), file)
    for link, target in sorted(loops):
        problems.append(
            Problem(
                main,
                "supervisor.include",
                f"the include globs go round a symlink loop: {link} -> {target}, a directory "
                "that contains the link; remove the link or make the pattern narrower",
            )
        )
    return sorted(found.values())


def _symlink_loop(path: Path) -> tuple[Path, Path] | None:
    """(link, target) when `path` goes through a symlink to a directory that contains it."""
    for ancestor in reversed(path.parents):
        if ancestor.is_symlink():
            target = Path(os.path.realpath(ancestor))
            if Path(os.path.realpath(ancestor.parent)).is_relative_to(target):
                return ancestor, target
    return None


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")
