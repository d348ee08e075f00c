"""Sealing what CRIU wrote: every file's size and BLAKE3 digest, files made private, and only
regular files accepted."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from grenadine_sv.store.durable import DIR_MODE, FILE_MODE
from grenadine_sv.store.sealing import seal_tree


def test_every_file_is_recorded_with_its_size_and_digest_and_made_private(
    tmp_path: Path,
) -> None:
    top = tmp_path / "criu"
    (top / "sub").mkdir(parents=True, mode=0o755)
    pages = os.urandom(3 << 20)
    (top / "pages-1.img").write_bytes(pages)
    (top / "sub" / "x.img").write_bytes(b"x")
    (top / "pages-1.img").chmod(0o644)

    records = seal_tree(top)

    assert set(records) == {"pages-1.img", "sub/x.img"}
    assert records["pages-1.img"].size == len(pages)
    assert records["pages-1.img"].digest == blake3.blake3(pages).hexdigest()
    assert records["sub/x.img"].digest == blake3.blake3(b"x").hexdigest()
    assert (top / "pages-1.img").stat().st_mode & 0o777 == FILE_MODE
    assert (top / "sub").stat().st_mode & 0o777 == DIR_MODE


def test_a_symlink_in_the_image_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "criu"
    top.mkdir()
    (tmp_path / "elsewhere").write_bytes(b"secret")
    (top / "inventory.img").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(ValueError, match="only regular files"):
        seal_tree(top)


def test_once_hashed_sees_every_record_and_its_failure_waits_for_the_fsyncs(
    tmp_path: Path,
) -> None:
    """meta.json is written from `once_hashed` while the fsyncs run; if writing it fails, the
    failure comes once every file has been made private and durable, never mid-seal."""
    top = tmp_path / "criu"
    top.mkdir()
    for name in ("core-1.img", "pages-1.img", "pstree.img"):
        (top / name).write_bytes(name.encode() * 1000)
        (top / name).chmod(0o644)
    seen: list[set[str]] = []

    def fail(records: object) -> None:
        assert isinstance(records, dict)
        seen.append(set(records))
        raise RuntimeError("meta.json could not be written")

    with pytest.raises(RuntimeError, match=r"meta\.json"):
        seal_tree(top, once_hashed=fail)

    assert seen == [{"core-1.img", "pages-1.img", "pstree.img"}]
    assert all(path.stat().st_mode & 0o777 == FILE_MODE for path in top.iterdir())
