"""Configuration problems: ConfigError, and pydantic's errors turned into user-facing lines.

Each line reads '<file>: <key.path>: <what was expected>, got <value>'.
"""

import datetime
import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from grenadine_sv.config.models import LOADER_FIELDS

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MAX_VALUE_CHARS = 80
_MAX_VALUE_DEPTH = 3

_EXPECTED_BY_ERROR_TYPE = {
    "string_type": "expected a string",
    "string_too_short": "expected a non-empty string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected an array",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "path_type": "expected a path string",
}
_COMPARISONS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


class ConfigError(Exception):
    """An invalid configuration. str(err) is the full message, one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one file; `where` is a dotted key path, a line/column, or ""."""

    file: Path
    where: str
    message: str

    def render(self, display: Callable[[Path], str] = str) -> str:
        parts = [display(self.file), self.where, self.message]
        return ": ".join(part for part in parts if part)


def key_path(loc: Sequence[str | int]) -> str:
    """The dotted TOML key path of a pydantic loc: ("programs", "a b", "command", 0) ->
    'programs."a b".command[0]'."""
    text = ""
    for segment in loc:
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            key = segment if _BARE_KEY.fullmatch(segment) else json.dumps(segment)
            text += f".{key}" if text else key
    return text


def render_value(value: object) -> str:
    """A short TOML-like rendering of a value a user wrote."""
    text = _toml_text(value, depth=0)
    if len(text) > _MAX_VALUE_CHARS:
        return text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _toml_text(value: object, depth: int) -> str:
    if depth > _MAX_VALUE_DEPTH:
        return "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_text(item, depth + 1) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{key_path([str(k)])} = {_toml_text(v, depth + 1)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return json.dumps(str(value), ensure_ascii=False)


def user_keys(model: type[BaseModel]) -> list[str]:
    """The keys a user may write in the model's table (hidden fields are set by the loader)."""
    return [name for name in model.model_fields if name not in LOADER_FIELDS]


def problems_from_validation_error(
    error: ValidationError, file: Path, root: type[BaseModel]
) -> list[Problem]:
    """One Problem per pydantic error of validating a file's document with model `root`."""
    return [
        Problem(file, key_path(_user_loc(details["loc"])), _describe(details, root))
        for details in error.errors()
    ]


def _user_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # A program's name comes from its table key: report it at the table.
    if len(loc) == 3 and loc[0] == "programs" and loc[2] == "name":
        return loc[:2]
    # An invalid key of a table is reported at that key.
    return tuple(segment for segment in loc if segment != "[key]")


def _describe(details: ErrorDetails, root: type[BaseModel]) -> str:
    error_type = details["type"]
    ctx: dict[str, Any] = dict(details.get("ctx") or {})
    if error_type == "missing":
        return "required key is missing"
    if error_type == "extra_forbidden":
        return _unknown_key(details["loc"], root)
    if error_type == "value_error":
        expected = str(ctx["error"])
    elif error_type in _EXPECTED_BY_ERROR_TYPE:
        expected = _EXPECTED_BY_ERROR_TYPE[error_type]
    elif error_type == "literal_error":
        expected = "expected " + str(ctx["expected"]).replace("'", '"')
    elif error_type in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        expected = f"expected a value {_COMPARISONS[error_type]} {_bound(ctx)}"
    elif error_type == "too_short":
        expected = f"expected at least {ctx['min_length']} item(s)"
    else:
        expected = "expected " + details["msg"].removeprefix("Input should be ")
    return f"{expected}, got {render_value(details['input'])}"


def _bound(ctx: dict[str, Any]) -> object:
    for key in ("ge", "gt", "le", "lt"):
        if key in ctx:
            return ctx[key]
    return "?"


def _unknown_key(loc: tuple[str | int, ...], root: type[BaseModel]) -> str:
    key = loc[-1]
    table = _model_at(root, loc[:-1])
    if table is not None and isinstance(key, str):
        close = difflib.get_close_matches(key, user_keys(table), n=1)
        if close:
            return f'unknown key, did you mean "{close[0]}"?'
    return "unknown key"


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose table sits at `loc` inside `root`, following fields and dict keys."""
    current: object = root
    for segment in loc:
        if get_origin(current) is dict:
            current = get_args(current)[1]
            continue
        model = _as_model(current)
        if model is None or not isinstance(segment, str) or segment not in model.model_fields:
            return None
        current = model.model_fields[segment].annotation
    return _as_model(current)


def _as_model(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
