"""What an image is: its id, its program, why it was taken (`Trigger`), the intent written
before a dump (`DumpIntent`) and the metadata of a listed image (`ImageMeta`, meta.json);
the names of the files and directories of the layout (images.py); and the errors about
images."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, field_validator

from grenadine_sv.config.units import check_program_name
from grenadine_sv.store.definition import SNAPSHOT_FORMAT_VERSION, RecordedDefinition
from grenadine_sv.store.sealing import (
    ChecksumAlgorithm,
)
from grenadine_sv.store.snapshot import SnapshotEntry

Trigger = Literal[
    "signal", "interval", "pre-deploy", "manual", "recovery", "pre-restore", "shutdown"
]

IMAGES_SUBDIR = "images"
META_FILE = "meta.json"
CRIU_SUBDIR = "criu"
INTENT_FILE = "intent.json"
# CRIU writes it last, after the dump succeeded and the tasks reached their final state.
DUMP_STATS_FILE = "stats-dump"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
# Written into an image's directory when a restore finds it corrupt; `images` shows it.
CORRUPT_MARK = "CORRUPT"
MIN_PREFIX_LEN = 4

IMAGE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
DECIMAL_PATTERN = re.compile(r"[0-9]+")
HEX_PATTERN = re.compile(r"[0-9a-f]+")

log = structlog.get_logger(__name__)


def validate_program_name(program: str) -> str:
    """Return `program` if it can name a directory under the store (the configuration's
    rule for program names), else raise ValueError."""
    try:
        return check_program_name(program)
    except ValueError as exc:
        raise ValueError(
            f"program name {program!r} cannot name an image directory: {exc}"
        ) from None


def validate_image_id(image_id: str) -> str:
    """Return `image_id` if it is 32 lowercase hex digits (uuid4().hex), else raise ValueError."""
    if not IMAGE_ID_PATTERN.fullmatch(image_id):
        raise ValueError(
            f"image id {image_id!r} is not valid: it must be 32 lowercase hexadecimal digits"
        )
    return image_id


def current_boot_id() -> str:
    return BOOT_ID_PATH.read_text().strip()


class DumpIntent(BaseModel):
    """What a dump is for, written before CRIU runs: enough to seal and list it later."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trigger: Trigger
    criu_version: str
    definition_digest: str
    leave_running: bool
    source_pid: int
    """Host pid of the dumped root (the sandbox's PID 1)."""
    source_start_time: int
    """Its start time in clock ticks since boot: with source_pid, names the very instance."""
    boot_id: str
    """Unsealed files of a dump from before a reboot may be torn: such a dump is not kept."""
    definition: RecordedDefinition | None = None
    init: bool = False
    """The root is the sandbox's init (tini), the program its child."""
    private_tmp: bool = False
    """The program's /tmp is recorded as an external mount named for it (not by host path)."""
    snapshot: list[str] = []
    """Program paths whose files the image holds a copy of (files/, see store/snapshot.py)."""


class ImageMeta(BaseModel):
    """What meta.json records about one image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    program: str
    created: datetime
    trigger: Trigger
    comm: str
    root_pid: int
    memory_bytes: int
    image_bytes: int
    criu_version: str
    definition_digest: str
    stdio_pipes: dict[str, int]
    dump_stats: dict[str, int]
    leave_running: bool
    init: bool = False
    """The root is the sandbox's init (tini), the program its child."""
    private_tmp: bool = False
    """The program's /tmp is recorded as an external mount named for it (not by host path)."""
    snapshot: list[str] = []
    """Program paths whose files the image holds a copy of (files/, see store/snapshot.py)."""
    snapshot_files: dict[str, SnapshotEntry] = {}
    """Relative path under files/ -> what it is (format_version 3 on; see store/snapshot.py)."""
    checksums: dict[str, str]
    """Relative path under criu/ -> hex digest (`checksum_algorithm`)."""
    file_sizes: dict[str, int]
    """Relative path under criu/ -> size in bytes (lets `verify` name a truncation cheaply)."""
    grenadine_version: str
    checksum_algorithm: ChecksumAlgorithm = "sha256"
    """Images before BLAKE3 have no such key: their digests are SHA-256."""
    source_pid: int | None = None
    """Host pid of the instance dumped (None in images made before it was recorded)."""
    source_start_time: int | None = None
    format_version: int = 1
    """1: images that record only definition_digest; 2: also `definition`; 3: also
    `snapshot_files`."""
    definition: RecordedDefinition | None = None
    """The program's definition when the image was taken (see store/definition.py)."""

    @property
    def records_snapshot(self) -> bool:
        """meta.json records the files/ of the image (older images have them unrecorded)."""
        return self.format_version >= SNAPSHOT_FORMAT_VERSION

    def froze(self, pid: int, start_time: int) -> bool:
        """True when this image was taken of that very instance, which the dump left frozen
        (a checkpoint that stops the program)."""
        return (
            not self.leave_running
            and self.source_pid == pid
            and self.source_start_time == start_time
        )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return validate_image_id(value)

    @field_validator("program")
    @classmethod
    def _check_program(cls, value: str) -> str:
        return validate_program_name(value)

    @field_validator("created")
    @classmethod
    def _check_created(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created must carry a time zone (it is stored in UTC)")
        return value.astimezone(UTC)


class ImageNotFound(LookupError):
    """No image of a program matches a reference."""


class AmbiguousImage(LookupError):
    """A reference matches more than one image of a program."""


class ImageCorrupt(Exception):
    """An image's files do not match the checksums recorded when it was made."""

    def __init__(self, image: ImageMeta, path: str, reason: str) -> None:
        super().__init__(
            f"image {image.id} of program {image.program!r} is corrupt: {path} {reason}; "
            f"remove it (grenadine-sv rmi {image.program} {image.id[:12]}) "
            "or restore another image"
        )
        self.image = image
        self.path = path
        self.reason = reason


def match_ref(images: list[ImageMeta], ref: str) -> list[ImageMeta]:
    """Images `ref` can mean, as a full id, an id prefix or an IDX (a 4-digit decimal ref may
    be both; it resolves only if both readings agree)."""
    matches: dict[str, ImageMeta] = {}
    if HEX_PATTERN.fullmatch(ref) and len(ref) >= MIN_PREFIX_LEN:
        matches.update((m.id, m) for m in images if m.id.startswith(ref))
    if DECIMAL_PATTERN.fullmatch(ref) and int(ref) < len(images):
        chosen = images[int(ref)]
        matches[chosen.id] = chosen
    return list(matches.values())
