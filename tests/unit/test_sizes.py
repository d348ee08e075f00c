"""Sizes (the *_logfile_maxbytes keys) are parsed by pydantic.ByteSize; this pins what the
configuration accepted before that change: the forms, the error message, the JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from grenadine_sv.config.loading import config_json_schema
from grenadine_sv.config.models import ProgramConfig

SIZE_MESSAGE = 'expected a size in bytes such as 1048576, "50MB" or "10KiB"'


def maxbytes(value: object) -> int:
    program = ProgramConfig.model_validate(
        {"name": "p", "command": ["x"], "source": Path("/x.toml"), "stdout_logfile_maxbytes": value}
    )
    return program.stdout_logfile_maxbytes


@pytest.mark.parametrize(
    ("written", "size"),
    [
        (0, 0),
        (1234, 1234),
        ("100", 100),
        ("100B", 100),
        ("50MB", 50_000_000),
        ("50mb", 50_000_000),
        ("10KiB", 10_240),
        ("10 kib", 10_240),
        ("  1GB ", 1_000_000_000),
        ("2GiB", 2 * 1024**3),
        ("1TB", 10**12),
        ("1TiB", 1024**4),
        ("1.5 KiB", 1536),
        ("0.5MiB", 512 * 1024),
        ("3kb", 3000),
    ],
)
def test_accepted_forms(written: object, size: int) -> None:
    assert maxbytes(written) == size


@pytest.mark.parametrize(
    "written", ["50XB", ".5MB", "1PB", "1EiB", "-1", "1e3", "MB", "", "5 M", -1, 1.5, True, None]
)
def test_refused_forms_say_what_is_expected(written: object) -> None:
    with pytest.raises(ValidationError) as caught:
        maxbytes(written)
    [error] = caught.value.errors()
    assert SIZE_MESSAGE in error["msg"]


def test_the_size_default_is_50_mib() -> None:
    program = ProgramConfig.model_validate({"name": "p", "command": ["x"], "source": "/x.toml"})
    assert program.stderr_logfile_maxbytes == 50 * 1024 * 1024


def test_json_schema_of_a_size() -> None:
    properties: dict[str, Any] = config_json_schema()["$defs"]["ProgramConfig"]["properties"]
    assert properties["stdout_logfile_maxbytes"] == {
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kmgtKMGT]i?B|B)?\s*$"},
        ],
        "default": 52428800,
        "description": "0: never rotate",
        "title": "Stdout Logfile Maxbytes",
    }
