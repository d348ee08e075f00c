"""Whether an image was made by the program definition it is about to be restored into."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grenadine_sv.store.images import ImageMeta


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
