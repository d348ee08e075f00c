"""What an image records of its program's definition, and which of the program's files it
holds a copy of: compared before a restore, written at a dump."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from grenadine_sv.config.loading import ProgramConfig
from grenadine_sv.config.models import RESTORE_COMPARED_FIELDS
from grenadine_sv.criu.facts import ImageFactsError, listening_unix_sockets
from grenadine_sv.sandbox.private_tmp import (
    private_tmp_dir,
)
from grenadine_sv.store.definition import (
    CurrentDefinition,
    DefinitionCheck,
    definition_changes,
)
from grenadine_sv.store.images import (
    ImageMeta,
)

log = structlog.get_logger()


OLD_FORMAT_WARNING = (
    "this image is from an older grenadine-sv and records only a digest of its program's "
    "definition: it matched, but what it was taken under cannot be shown"
)


def host_path(config: ProgramConfig, path: Path, state_dir: Path) -> Path:
    """Where a path the program sees is on the host (its private /tmp is elsewhere)."""
    bound = any(path.is_relative_to(bind) for bind in config.binds)
    if config.private_tmp and path.is_relative_to("/tmp") and not bound:
        return private_tmp_dir(state_dir, config.name) / path.relative_to("/tmp")
    return path


def warn_about_moved_sockets(config: ProgramConfig, criu_dir: Path, state_dir: Path) -> None:
    """Name each listening unix socket that is no longer at the path it was bound to (haproxy
    binds admin.sock.PID.tmp, then renames it): CRIU restores it at the bound path."""
    try:
        bound_paths = listening_unix_sockets(criu_dir)
    except ImageFactsError as exc:
        log.warning("unix_sockets_unknown", program=config.name, error=str(exc))
        return
    for bound in bound_paths:
        if not os.path.exists(host_path(config, Path(bound), state_dir)):
            log.warning(
                "unix_socket_moved_after_bind",
                program=config.name,
                socket=bound,
                detail=f"a restore re-creates this socket at {bound}, where it was bound, not"
                " where the program moved it: clients of the moved path will not reach it",
            )


def snapshot_sources(config: ProgramConfig, state_dir: Path) -> dict[str, Path]:
    """Program path -> host path of the files an image of `config` holds a copy of: the
    private /tmp, and checkpoint.snapshot (seen through the private /tmp when below it)."""
    tmp = private_tmp_dir(state_dir, config.name) if config.private_tmp else None
    sources: dict[str, Path] = {}
    if tmp is not None:
        sources["/tmp"] = tmp
    for path in config.checkpoint.snapshot:
        bound = any(path.is_relative_to(bind) for bind in config.binds)
        if tmp is not None and path.is_relative_to("/tmp") and not bound:
            continue  # inside the private /tmp, copied with it
        sources[str(path)] = path  # the sandbox sees the host's / and binds at their paths
    return sources


def current_definition(config: ProgramConfig) -> CurrentDefinition:
    """What an image records, and a restore compares, of a program's definition."""
    compared = {name for name in RESTORE_COMPARED_FIELDS if name in type(config).model_fields}
    return CurrentDefinition(
        fields=config.model_dump(mode="json", include=compared),
        environment=dict(config.environment),
        digest=config.definition_digest(),
    )


def check_definition(config: ProgramConfig, image: ImageMeta) -> DefinitionCheck:
    return definition_changes(image.definition, image.definition_digest, current_definition(config))


def changed_definition_message(image: ImageMeta, check: DefinitionCheck) -> str:
    return (
        f"image {image.id} of {image.program} was taken under another definition of the "
        f"program ({check.describe()}); restoring it would bring the old one back. Restore it "
        "anyway with `grenadine-sv restore --allow-changed-definition`, or take a new image"
    )
