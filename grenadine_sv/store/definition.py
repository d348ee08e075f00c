"""The definition a program had when an image was taken, and how it differs from one now.

An image holds a process as it ran: its command line, user, environment and mounts are in its
memory and in CRIU's files. Restoring it into a program whose definition has changed since
brings the old one back silently (the old user, the old secret). `meta.json` therefore records
the fields that shape the process, and `definition_changes` names what differs. Environment
values are never recorded: only a keyed hash of each (HMAC-SHA256 with a random key stored
beside it), enough to tell that a value changed and useless to guess it from.

Pure functions over recorded data: the restore path, image import and remote restore all use
the same comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue

# 1: images that record only `definition_digest`; 2: they record the fields themselves;
# 3: they also record their snapshot files (files/).
META_FORMAT_VERSION = 3
SNAPSHOT_FORMAT_VERSION = 3
# Longest value shown in a message before it is cut.
SHOWN_VALUE_CHARS = 80


class RecordedDefinition(BaseModel):
    """What an image records of its program's definition."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fields: dict[str, JsonValue]
    """Field name -> its value as JSON (command, directory, user, group, umask, binds, and
    the sandbox settings a definition has)."""
    environment: dict[str, str]
    """Variable name -> HMAC-SHA256 of its value under `environment_key` (never the value)."""
    environment_key: str
    """Random hex key of those HMACs, one per image."""


@dataclass(frozen=True)
class CurrentDefinition:
    """A program's definition now, as the comparison needs it."""

    fields: Mapping[str, Any]
    """Field name -> value as JSON, the same names an image records."""
    environment: Mapping[str, str]
    """Variable name -> value (hashed here, never kept)."""
    digest: str
    """The definition digest, all that images of format 1 recorded."""


@dataclass(frozen=True)
class DefinitionCheck:
    """Whether an image's recorded program definition matches the configured one."""

    changes: tuple[str, ...]
    """What differs, one phrase each ("user: null -> \"nobody\"", "environment SECRET
    changed"); empty when the image may be restored."""
    recorded_fields: bool
    """False for an image from before the fields were recorded (compared on its digest)."""

    @property
    def unchanged(self) -> bool:
        return not self.changes

    def describe(self) -> str:
        return "; ".join(self.changes)


def record_definition(current: CurrentDefinition) -> RecordedDefinition:
    """What a new image records of `current` (with a fresh key for the environment hashes)."""
    key = secrets.token_hex(32)
    return RecordedDefinition(
        fields={name: _as_json(value) for name, value in current.fields.items()},
        environment={name: _keyed_hash(key, value) for name, value in current.environment.items()},
        environment_key=key,
    )


def definition_changes(
    recorded: RecordedDefinition | None, recorded_digest: str, current: CurrentDefinition
) -> DefinitionCheck:
    """How `current` differs from what an image recorded.

    Fields the image did not record (settings added to grenadine-sv after it was taken) are
    not compared. An image with no recorded definition is compared on its digest alone: a
    change is then reported without naming the field, which that image cannot tell."""
    if recorded is None:
        if recorded_digest == current.digest:
            return DefinitionCheck(changes=(), recorded_fields=False)
        return DefinitionCheck(
            changes=(
                "the definition changed (this image, from an older grenadine-sv, records "
                "only a digest of it, so what changed cannot be named)",
            ),
            recorded_fields=False,
        )
    changes: list[str] = []
    for name, then in recorded.fields.items():
        now = _as_json(current.fields.get(name))
        if now != then:
            changes.append(f"{name}: {_shown(then)} -> {_shown(now)}")
    key = recorded.environment_key
    for name in sorted(recorded.environment.keys() | current.environment.keys()):
        then_hash = recorded.environment.get(name)
        value = current.environment.get(name)
        if value is None:
            changes.append(f"environment {name} removed")
        elif then_hash is None:
            changes.append(f"environment {name} added")
        elif not hmac.compare_digest(then_hash, _keyed_hash(key, value)):
            changes.append(f"environment {name} changed")
    return DefinitionCheck(changes=tuple(changes), recorded_fields=True)


def _keyed_hash(key: str, value: str) -> str:
    return hmac.new(bytes.fromhex(key), value.encode(), hashlib.sha256).hexdigest()


def _as_json(value: Any) -> JsonValue:
    """The value as JSON would carry it (tuples become lists, paths strings)."""
    result: JsonValue = json.loads(json.dumps(value, default=str))
    return result


def _shown(value: JsonValue) -> str:
    text = json.dumps(value)
    if len(text) > SHOWN_VALUE_CHARS:
        return text[: SHOWN_VALUE_CHARS - 3] + "..."
    return text
