"""Comparing the definition an image was taken under with the one it would be restored into."""

from __future__ import annotations

import json

from grenadine_sv.store.definition import (
    CurrentDefinition,
    RecordedDefinition,
    definition_changes,
    record_definition,
)
from grenadine_sv.store.images import ImageMeta

FIELDS = {
    "command": ["/usr/bin/counter", "--port", "8000"],
    "directory": "/",
    "user": None,
    "group": None,
    "umask": None,
    "binds": [],
}
THEN = CurrentDefinition(fields=FIELDS, environment={"SECRET": "hunter2", "MODE": "a"}, digest="d1")


def now(**changes: object) -> CurrentDefinition:
    environment = changes.pop("environment", THEN.environment)
    assert isinstance(environment, dict)
    return CurrentDefinition(fields={**FIELDS, **changes}, environment=environment, digest="d2")


def test_an_equal_definition_has_no_changes() -> None:
    recorded = record_definition(THEN)
    check = definition_changes(recorded, "d1", now())
    assert check.unchanged
    assert check.recorded_fields


def test_user_and_secret_changes_are_named_without_the_secret() -> None:
    recorded = record_definition(THEN)
    current = now(user="nobody", environment={"SECRET": "rotated", "MODE": "a"})

    check = definition_changes(recorded, "d1", current)

    assert check.changes == ('user: null -> "nobody"', "environment SECRET changed")
    text = check.describe() + json.dumps(recorded.model_dump())
    assert "hunter2" not in text
    assert "rotated" not in text


def test_command_argument_added_and_removed_variables_are_named() -> None:
    recorded = record_definition(THEN)
    current = now(
        command=["/usr/bin/counter", "--port", "8001"], environment={"SECRET": "hunter2", "X": "1"}
    )

    check = definition_changes(recorded, "d1", current)

    assert check.changes == (
        'command: ["/usr/bin/counter", "--port", "8000"] -> ["/usr/bin/counter", "--port", "8001"]',
        "environment MODE removed",
        "environment X added",
    )


def test_environment_hashes_are_keyed_per_image() -> None:
    first, second = record_definition(THEN), record_definition(THEN)
    assert first.environment["SECRET"] != second.environment["SECRET"]
    assert definition_changes(second, "d1", now()).unchanged


def test_fields_an_image_did_not_record_are_not_compared() -> None:
    recorded = record_definition(THEN)
    assert definition_changes(recorded, "d1", now(init=True)).unchanged


def test_an_old_image_is_compared_on_its_digest() -> None:
    same = CurrentDefinition(fields=FIELDS, environment={}, digest="d1")
    other = CurrentDefinition(fields=FIELDS, environment={}, digest="d9")

    kept = definition_changes(None, "d1", same)
    changed = definition_changes(None, "d1", other)

    assert kept.unchanged
    assert not kept.recorded_fields
    assert not changed.unchanged
    assert "cannot be named" in changed.describe()


def test_meta_json_of_an_older_format_still_loads() -> None:
    old = {
        "id": "a" * 32,
        "program": "counter",
        "created": "2024-05-01T12:00:00Z",
        "trigger": "manual",
        "comm": "python3",
        "root_pid": 1,
        "memory_bytes": 1,
        "image_bytes": 1,
        "criu_version": "4.2.1",
        "definition_digest": "d1",
        "stdio_pipes": {},
        "dump_stats": {},
        "leave_running": True,
        "checksums": {},
        "file_sizes": {},
        "grenadine_version": "0.1.0",
    }
    meta = ImageMeta.model_validate(old)
    assert meta.format_version == 1
    assert meta.definition is None
    recorded = RecordedDefinition(fields={}, environment={}, environment_key="00")
    assert ImageMeta.model_validate({**old, "definition": recorded.model_dump()}).definition
