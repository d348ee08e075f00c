"""Whether an image was made by the program definition it is about to be restored into."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from grenadine_sv.store.archive import ArchiveRefused
from grenadine_sv.store.images import ImageMeta


class ProgramDefinition(Protocol):
    def definition_digest(self) -> str: ...

    def definition_fields(self) -> dict[str, Any]: ...


def acceptance(
    programs: Mapping[str, ProgramDefinition], defined_by: str, allow_changed: bool
) -> Callable[[ImageMeta], None]:
    """The test an archive's meta.json must pass before it is received: its program must be
    among `programs` (those `defined_by` defines), by the same definition unless
    `allow_changed`. Raises ArchiveRefused naming what differs."""

    def accept(meta: ImageMeta) -> None:
        program = programs.get(meta.program)
        if program is None:
            raise ArchiveRefused(
                f"it holds an image of program {meta.program!r}, which {defined_by} does not define"
            )
        differences = definition_differences(
            meta, program.definition_digest(), program.definition_fields()
        )
        if differences and not allow_changed:
            raise ArchiveRefused(
                f"its image of {meta.program} was made by a different definition of the "
                f"program: {'; '.join(differences)} (allow it with --allow-changed-definition)"
            )

    return accept


def definition_differences(image: ImageMeta, digest: str, fields: Mapping[str, Any]) -> list[str]:
    """What differs between the definition that made `image` and the current one (its digest
    and DIGEST_FIELDS values), one phrase per field; empty when they are the same."""
    if image.definition_digest == digest:
        return []
    if image.definition is None:
        return ["the definition (the image records only its digest, not the fields)"]
    recorded = image.definition
    return [
        f"{key} ({_show(recorded.get(key))} in the image, {_show(fields.get(key))} here)"
        for key in sorted(set(recorded) | set(fields))
        if recorded.get(key) != fields.get(key)
    ] or ["the definition (same fields, different digest: made by another version?)"]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
