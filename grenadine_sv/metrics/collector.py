"""Prometheus metrics: what the supervisor counts and what the image store holds
(endpoint.py serves them).

Counters and histograms are updated by the supervisor as things happen. Image figures and
whether each program is up are read when scraped (`StoreCollector`), so they are true after a
restart of the supervisor and after a prune. Metric names are a contract (README, "Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, get_args

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.metrics.program_series import Kind, ProgramSeries, SeriesSpec
from grenadine_sv.store.images import Trigger

log = structlog.get_logger()

# Every trigger's counter starts at 0 so rate() works at once.
CHECKPOINT_TRIGGERS: tuple[str, ...] = get_args(Trigger)
# From a small idle daemon (tens of milliseconds) to a large memory image (a minute).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# Uploads and downloads of images: from a small archive to gigabytes over a slow link.
TRANSFER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RESTARTS = "grenadine_program_restarts"
CHECKPOINTS = "grenadine_checkpoints"
CHECKPOINT_FAILURES = "grenadine_checkpoint_failures"
CHECKPOINT_DURATION = "grenadine_checkpoint_duration_seconds"
CHECKPOINT_FROZEN = "grenadine_checkpoint_frozen_seconds"
LAST_CHECKPOINT_SUCCESS = "grenadine_last_checkpoint_success_timestamp_seconds"
RESTORES = "grenadine_restores"
RESTORE_FAILURES = "grenadine_restore_failures"
RESTORE_DURATION = "grenadine_restore_duration_seconds"
RESTORE_MEMORY_COMPLETE = "grenadine_restore_memory_complete_seconds"
UPLOADS = "grenadine_uploads"
UPLOAD_FAILURES = "grenadine_upload_failures"
UPLOAD_DURATION = "grenadine_upload_duration_seconds"
REMOTE_IMAGES = "grenadine_remote_images"
DOWNLOADS = "grenadine_downloads"
DOWNLOAD_FAILURES = "grenadine_download_failures"
DOWNLOAD_DURATION = "grenadine_download_duration_seconds"

# The series every program has, updated as things happen.
PROGRAM_SERIES = (
    SeriesSpec(
        RESTARTS,
        "Times the program was started again after an exit or a failed start",
        Kind.COUNTER,
    ),
    SeriesSpec(
        CHECKPOINTS, "Checkpoints that produced an image", Kind.COUNTER, ("program", "trigger")
    ),
    SeriesSpec(
        CHECKPOINT_FAILURES,
        "Checkpoints that failed and kept no image",
        Kind.COUNTER,
        ("program", "trigger"),
    ),
    SeriesSpec(
        CHECKPOINT_DURATION,
        "Wall time of successful checkpoints, from freeze to durable image",
        Kind.HISTOGRAM,
        buckets=DURATION_BUCKETS,
    ),
    SeriesSpec(
        CHECKPOINT_FROZEN,
        "Time the program was frozen during successful checkpoints (CRIU frozen_time)",
        Kind.HISTOGRAM,
        buckets=DURATION_BUCKETS,
    ),
    SeriesSpec(
        LAST_CHECKPOINT_SUCCESS,
        "Unix time of the program's last successful checkpoint (absent until one since start)",
        Kind.GAUGE,
    ),
    SeriesSpec(RESTORES, "Restores that brought the program back from an image", Kind.COUNTER),
    SeriesSpec(RESTORE_FAILURES, "Restores that failed", Kind.COUNTER),
    SeriesSpec(
        RESTORE_DURATION,
        "Wall time of successful restores, image verification included",
        Kind.HISTOGRAM,
        buckets=DURATION_BUCKETS,
    ),
    SeriesSpec(
        RESTORE_MEMORY_COMPLETE,
        "Lazy restores: time from the restore's start until all memory was back and verified",
        Kind.HISTOGRAM,
        buckets=DURATION_BUCKETS,
    ),
    SeriesSpec(UPLOADS, "Images uploaded to the object store", Kind.COUNTER),
    SeriesSpec(
        UPLOAD_FAILURES,
        "Upload attempts that failed (the image stays queued and is retried)",
        Kind.COUNTER,
    ),
    SeriesSpec(
        UPLOAD_DURATION,
        "Wall time of successful uploads: archive, compress, encrypt and send",
        Kind.HISTOGRAM,
        buckets=TRANSFER_BUCKETS,
    ),
    SeriesSpec(
        REMOTE_IMAGES, "Images of the program in the object store (as last listed)", Kind.GAUGE
    ),
    SeriesSpec(
        DOWNLOADS, "Images downloaded from the object store, decrypted and verified", Kind.COUNTER
    ),
    SeriesSpec(
        DOWNLOAD_FAILURES,
        "Downloads that failed or were refused (decryption, checksum, definition)",
        Kind.COUNTER,
    ),
    SeriesSpec(
        DOWNLOAD_DURATION,
        "Wall time of successful downloads, verification included",
        Kind.HISTOGRAM,
        buckets=TRANSFER_BUCKETS,
    ),
)
# Gauges with no meaningful zero: absent until their first value.
ABSENT_UNTIL_SET = frozenset({LAST_CHECKPOINT_SUCCESS, REMOTE_IMAGES})


class ImageMetaLike(Protocol):
    @property
    def memory_bytes(self) -> int: ...


class ImageStoreLike(Protocol):
    """What the metrics read from the image store (grenadine_sv.images.ImageStore)."""

    def programs(self) -> Sequence[str]: ...

    def usage(self, program: str) -> tuple[int, int]: ...

    def list(self, program: str) -> Sequence[ImageMetaLike]: ...

    def free_bytes(self) -> int: ...


class ProgramStatusLike(Protocol):
    @property
    def state(self) -> str: ...

    def restored_image_created(self) -> datetime | None:
        """When the image the running instance was restored from was made (None: cold)."""
        ...


ProgramTable = Callable[[], Mapping[str, ProgramStatusLike]]


@dataclass(frozen=True)
class ImageFigures:
    count: int
    bytes: int
    latest_memory_bytes: int | None


@dataclass(frozen=True)
class StoreFamilies:
    up: GaugeMetricFamily
    images: GaugeMetricFamily
    image_bytes: GaugeMetricFamily
    latest_memory: GaugeMetricFamily
    free_bytes: GaugeMetricFamily
    running_image_age: GaugeMetricFamily

    @classmethod
    def empty(cls) -> StoreFamilies:
        return cls(
            up=GaugeMetricFamily(
                "grenadine_program_up",
                "1 if the program is RUNNING, else 0",
                labels=["program"],
            ),
            images=GaugeMetricFamily(
                "grenadine_images",
                "Number of checkpoint images the program has in the image store",
                labels=["program"],
            ),
            image_bytes=GaugeMetricFamily(
                "grenadine_image_bytes",
                "Bytes of disk used by the program's checkpoint images",
                labels=["program"],
            ),
            latest_memory=GaugeMetricFamily(
                "grenadine_latest_image_memory_bytes",
                "Memory bytes recorded in the program's newest checkpoint image",
                labels=["program"],
            ),
            free_bytes=GaugeMetricFamily(
                "grenadine_state_dir_free_bytes",
                "Bytes available to the supervisor on the filesystem of state_dir",
            ),
            running_image_age=GaugeMetricFamily(
                "grenadine_program_image_age_seconds",
                "Age of the image the running instance was restored from "
                "(absent when it started from scratch)",
                labels=["program"],
            ),
        )

    def all(self) -> list[Metric]:
        return [
            self.up,
            self.images,
            self.image_bytes,
            self.latest_memory,
            self.free_bytes,
            self.running_image_age,
        ]


class StoreCollector:
    """Collects, at scrape time, grenadine_program_up and the image figures.

    `programs` is called from the thread that renders the scrape: it must return a snapshot
    (a dict copy such as `lambda: dict(supervisor.runners)` is one; CPython copies a dict
    atomically), not a view that the event loop changes while it is read.
    """

    def __init__(self, store: ImageStoreLike, programs: ProgramTable) -> None:
        self._store = store
        self._programs = programs

    def describe(self) -> Iterable[Metric]:
        return StoreFamilies.empty().all()

    def collect(self) -> Iterable[Metric]:
        families = StoreFamilies.empty()
        programs = dict(self._programs())
        states = {name: status.state for name, status in programs.items()}
        now = datetime.now(UTC)
        for name in sorted(states):
            families.up.add_metric([name], 1.0 if states[name] == State.RUNNING else 0.0)
            created = programs[name].restored_image_created()
            if created is not None:
                age = max((now - created).total_seconds(), 0.0)
                families.running_image_age.add_metric([name], age)

        try:
            on_disk = set(self._store.programs())
        except OSError as exc:
            log.warning("metrics_images_unreadable", error=str(exc))
            on_disk = set()
        for name in sorted(on_disk | set(states)):
            figures = self._read_figures(name)
            if figures is None:
                continue
            families.images.add_metric([name], figures.count)
            families.image_bytes.add_metric([name], figures.bytes)
            if figures.latest_memory_bytes is not None:
                families.latest_memory.add_metric([name], figures.latest_memory_bytes)
        try:
            families.free_bytes.add_metric([], self._store.free_bytes())
        except OSError as exc:
            log.warning("metrics_free_space_unreadable", error=str(exc))
        return families.all()

    def _read_figures(self, program: str) -> ImageFigures | None:
        try:
            count, size = self._store.usage(program)
            newest = self._store.list(program)[:1]
        except OSError as exc:
            # An image deleted while it was measured, or an unreadable directory: this scrape
            # leaves the program's figures out rather than failing whole.
            log.warning("metrics_images_unreadable", program=program, error=str(exc))
            return None
        latest = newest[0].memory_bytes if newest else None
        return ImageFigures(count=count, bytes=size, latest_memory_bytes=latest)


class Metrics:
    """Every metric of the supervisor, in a registry of its own."""

    def __init__(
        self,
        *,
        store: ImageStoreLike,
        programs: ProgramTable,
        criu_version: str,
        version: str,
    ) -> None:
        # prometheus-client would add a `_created` series beside every counter and histogram;
        # the switch is process-wide and the supervisor has no other metrics.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)

        build_info = Gauge(
            "grenadine_build_info",
            "Versions of grenadine-sv and of the CRIU it uses; always 1",
            ["version", "criu_version"],
            registry=self.registry,
        )
        build_info.labels(version=version, criu_version=criu_version).set(1)

        self._series = ProgramSeries(PROGRAM_SERIES)
        self.registry.register(self._series)
        self._upload_queue = Gauge(
            "grenadine_upload_queue_length",
            "Images sealed locally and waiting for upload",
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store, programs))

    def add_program(self, program: str) -> None:
        """Start the program's counters and histograms at 0, so rate() works from the first
        scrape rather than from the first event."""
        for spec in PROGRAM_SERIES:
            if spec.name in ABSENT_UNTIL_SET:
                continue
            if "trigger" in spec.labels:
                for trigger in CHECKPOINT_TRIGGERS:
                    self._series.zero(spec.name, program, trigger)
            else:
                self._series.zero(spec.name, program)

    def forget_program(self, program: str) -> None:
        """Drop the program's series (it was removed from the configuration)."""
        self._series.forget(program)

    def program_restarted(self, program: str) -> None:
        self._series.inc(RESTARTS, program)

    def checkpoint_succeeded(
        self, program: str, trigger: str, duration_seconds: float, frozen_seconds: float
    ) -> None:
        self._series.inc(CHECKPOINTS, program, trigger)
        self._series.observe(CHECKPOINT_DURATION, duration_seconds, program)
        self._series.observe(CHECKPOINT_FROZEN, frozen_seconds, program)
        self._series.set(LAST_CHECKPOINT_SUCCESS, time.time(), program)

    def checkpoint_failed(self, program: str, trigger: str) -> None:
        self._series.inc(CHECKPOINT_FAILURES, program, trigger)

    def restore_succeeded(self, program: str, duration_seconds: float) -> None:
        self._series.inc(RESTORES, program)
        self._series.observe(RESTORE_DURATION, duration_seconds, program)

    def restore_failed(self, program: str) -> None:
        self._series.inc(RESTORE_FAILURES, program)

    def restore_memory_complete(self, program: str, seconds: float) -> None:
        self._series.observe(RESTORE_MEMORY_COMPLETE, seconds, program)

    def upload_succeeded(self, program: str, duration_seconds: float) -> None:
        self._series.inc(UPLOADS, program)
        self._series.observe(UPLOAD_DURATION, duration_seconds, program)

    def upload_failed(self, program: str) -> None:
        self._series.inc(UPLOAD_FAILURES, program)

    def upload_queue_changed(self, length: int) -> None:
        self._upload_queue.set(length)

    def remote_images_seen(self, program: str, count: int) -> None:
        self._series.set(REMOTE_IMAGES, count, program)

    def download_succeeded(self, program: str, duration_seconds: float) -> None:
        self._series.inc(DOWNLOADS, program)
        self._series.observe(DOWNLOAD_DURATION, duration_seconds, program)

    def download_failed(self, program: str) -> None:
        self._series.inc(DOWNLOAD_FAILURES, program)

    def render(self) -> bytes:
        """The text exposition format (0.0.4). Reads the image store: call it off the loop."""
        return generate_latest(self.registry)
