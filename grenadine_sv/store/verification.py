"""Checking an image's files against what its meta.json records: present, regular, owned
by the supervisor's user and of their recorded size (cheap), and hashed (a full verify)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from grenadine_sv.store.image_meta import CRIU_SUBDIR, ImageCorrupt, ImageMeta
from grenadine_sv.store.sealing import NEW_IMAGE_ALGORITHM, FileRecord, digest_of, walk_tree


def check_files(image: ImageMeta, criu_dir: Path) -> None:
    """Every file of `image` present, regular and of its recorded size, and no other."""
    if not criu_dir.is_dir():
        raise ImageCorrupt(image, f"{CRIU_SUBDIR}/", "is missing")
    present = dict(walk_tree(criu_dir)[0])
    # Cheap checks on every file first, so a truncated image fails before any hashing.
    for rel in sorted(image.checksums):
        path = present.pop(rel, None)
        if path is None:
            raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", "is missing")
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", "is not a regular file")
        if st.st_uid != os.geteuid():
            raise ImageCorrupt(
                image,
                f"{CRIU_SUBDIR}/{rel}",
                f"is owned by uid {st.st_uid}, not by the supervisor's user",
            )
        expected_size = image.file_sizes.get(rel, st.st_size)
        if st.st_size != expected_size:
            raise ImageCorrupt(
                image,
                f"{CRIU_SUBDIR}/{rel}",
                f"has {st.st_size} bytes, expected {expected_size}",
            )
    if present:
        raise ImageCorrupt(
            image,
            f"{CRIU_SUBDIR}/{min(present)}",
            "was not part of the dump (is CRIU's work dir for restores inside the image?)",
        )


def verify_files(
    image: ImageMeta, criu_dir: Path, skip: Callable[[str], bool] | None = None
) -> None:
    """check_files, then hash every file (but those `skip` is true for) against its digest."""
    check_files(image, criu_dir)
    for rel in sorted(image.checksums):
        if skip is None or not skip(rel):
            verify_file(image, rel, criu_dir)


def verify_file(image: ImageMeta, rel: str, criu_dir: Path) -> None:
    """Hash one file of `image` and raise ImageCorrupt if it does not match."""
    try:
        digest = digest_of(criu_dir / rel, image.checksum_algorithm)
    except (OSError, ValueError) as exc:
        raise ImageCorrupt(image, f"{CRIU_SUBDIR}/{rel}", f"cannot be read ({exc})") from exc
    if digest != image.checksums[rel]:
        raise ImageCorrupt(
            image,
            f"{CRIU_SUBDIR}/{rel}",
            f"does not match its {image.checksum_algorithm} checksum",
        )


def check_received(
    meta: ImageMeta,
    image_id: str,
    program: str,
    records: Mapping[str, FileRecord],
    criu_dir: Path,
) -> None:
    """Raise unless the received files are exactly those meta.json lists, byte for byte."""
    if (meta.id, meta.program) != (image_id, program):
        raise ValueError(f"meta.json names image {meta.id} of {meta.program!r}")
    for rel in sorted(set(records) | set(meta.checksums)):
        record = records.get(rel)
        where = f"{CRIU_SUBDIR}/{rel}"
        if record is None:
            raise ImageCorrupt(meta, where, "is missing")
        if rel not in meta.checksums:
            raise ImageCorrupt(meta, where, "is not listed in meta.json")
        digest = (
            record.digest
            if meta.checksum_algorithm == NEW_IMAGE_ALGORITHM
            else digest_of(criu_dir / rel, meta.checksum_algorithm)
        )
        if digest != meta.checksums[rel]:
            raise ImageCorrupt(
                meta, where, f"does not match its {meta.checksum_algorithm} checksum"
            )
