"""The wiring: a Supervisor with the parts a configuration asks for (checkpoints, metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from grenadine_sv import __version__
from grenadine_sv.config.loading import Config
from grenadine_sv.criu.binary import CriuNotFound, CriuVersionUnknown, criu_version, find_criu
from grenadine_sv.criu.client import Criu
from grenadine_sv.store.encryption import EncryptionKeyError
from grenadine_sv.store.images import ImageStore
from grenadine_sv.supervisor.checkpointing import Checkpointing
from grenadine_sv.supervisor.checkpoints import CheckpointService
from grenadine_sv.supervisor.core import StartupError, Supervisor
from grenadine_sv.supervisor.definitions import current_definition
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.supervisor.recovery import Recovery

if TYPE_CHECKING:
    from grenadine_sv.metrics.collector import Metrics

log = structlog.get_logger()


def find_usable_criu(config: Config) -> tuple[Path, str] | None:
    """The CRIU binary and its version, or None (with a warning) when none is usable."""
    try:
        binary = find_criu(config.supervisor.criu)
        version = ".".join(str(part) for part in criu_version(binary))
    except (CriuNotFound, CriuVersionUnknown) as exc:
        log.warning("checkpoints_unavailable", reason=str(exc))
        return None
    return binary, version


def build_supervisor(config: Config) -> Supervisor:
    """A supervisor with everything the configuration asks for: checkpoints, metrics."""
    criu = find_usable_criu(config)
    state_dir = config.supervisor.state_dir
    store = ImageStore(state_dir)
    metrics: Metrics | None = None
    programs: Programs
    if config.supervisor.metrics.address() is not None:
        # prometheus_client and the HTTP server are loaded only for an enabled endpoint.
        from grenadine_sv.metrics.collector import Metrics

        metrics = Metrics(
            store=store,
            programs=lambda: dict(programs.runners),
            criu_version=criu[1] if criu is not None else "none",
            version=__version__,
        )
    service = None
    if criu is not None:
        binary, version = criu
        service = CheckpointService(
            store, Criu(binary), version, state_dir / "restore-logs", metrics
        )
    recovery = Recovery(state_dir, service)
    programs = Programs(
        config,
        metrics,
        observers=(recovery.record_instances,),
        launcher=service.launch_pinned if service is not None else None,
    )
    supervisor: Supervisor
    remote = config.supervisor.remote
    if service is not None and remote is not None and remote.url is not None:
        from grenadine_sv.supervisor.remote import RemoteImages  # only with an object store

        try:
            service.remote = RemoteImages(
                remote,
                store,
                lambda: supervisor.config.programs,
                current_definition,
                metrics=metrics,
            )
        except EncryptionKeyError as exc:
            raise StartupError(f"{config.path}: {exc}", configuration=True) from exc
    supervisor = Supervisor(
        config,
        programs=programs,
        deploys=Deploys(programs, service),
        checkpointing=Checkpointing(programs, service),
        recovery=recovery,
        metrics=metrics,
    )
    return supervisor
