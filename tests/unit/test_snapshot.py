"""Copies of a program's files into an image and back (store/snapshot.py), on real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from grenadine_sv.store.snapshot import snapshot_paths, take_snapshot, write_back

pytestmark = pytest.mark.root  # files owned by another user


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file").write_text("contents")
    os.chmod(root / "sub" / "file", 0o640)
    os.chmod(root, 0o1777)
    (root / "link").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo")
    os.chown(root / "sub" / "file", 65534, 65534)
    return root


def test_a_snapshot_is_a_real_copy_keeping_owners_modes_and_symlinks(
    tree: Path, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    image.mkdir()
    summary = take_snapshot({"/data": tree, "/gone": tmp_path / "absent"}, image)
    assert summary.bytes_copied == len("contents")
    manifest = snapshot_paths(image)
    assert manifest["/gone"] is None
    copy = image / "files" / manifest["/data"]  # type: ignore[operator]
    assert (copy / "sub" / "file").read_text() == "contents"
    info = (copy / "sub" / "file").stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o640)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o1777
    assert os.readlink(copy / "link") == "/etc/hostname", "the symlink, not its target"
    assert stat.S_ISFIFO((copy / "fifo").lstat().st_mode)
    # A real copy: changing the original leaves the snapshot as it was.
    (tree / "sub" / "file").write_text("changed after the dump")
    assert (copy / "sub" / "file").read_text() == "contents"


def test_write_back_restores_only_the_listed_paths(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("before")
    image = tmp_path / "image"
    image.mkdir()
    take_snapshot({"/data": tree, "/other": other}, image)
    (tree / "sub" / "file").write_text("changed")
    (tree / "new").write_text("made after the dump")
    other.write_text("after")

    written = write_back(image, {"/data": tree})

    assert written == ["/data"]
    assert (tree / "sub" / "file").read_text() == "contents"
    assert not (tree / "new").exists()
    assert other.read_text() == "after", "a path the definition no longer lists stays"


def test_a_path_absent_at_the_dump_is_removed_at_write_back(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    path = tmp_path / "later"
    take_snapshot({"/later": path}, image)
    path.write_text("made after the dump")
    assert write_back(image, {"/later": path}) == ["/later"]
    assert not path.exists()
