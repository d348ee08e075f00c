"""An image's snapshot files (files/) travel in its archive: recorded in meta.json when the
image is sealed, verified locally and on arrival, recreated with their owners and modes."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from grenadine_sv.store.archive import ArchiveRefused, ArchiveStream, write_archive
from grenadine_sv.store.images import ImageCorrupt, ImageMeta, ImageStore
from grenadine_sv.store.snapshot import snapshot_paths, take_snapshot, write_back
from tests.unit.test_archive import archive_of, leftovers, receive
from tests.unit.test_images import CRIU_FILES, FACTS, INTENT

pytestmark = pytest.mark.root  # files owned by another user

NOBODY = 65534


@pytest.fixture
def program_files(tmp_path: Path) -> Path:
    """A program's data directory: a file of another owner, a symlink, a FIFO, a subdir."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "state.db").write_bytes(b"\x07" * 70000)
    os.chown(root / "sub" / "state.db", NOBODY, NOBODY)
    os.chmod(root / "sub" / "state.db", 0o640)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo")
    os.chmod(root, 0o1777)
    return root


def image_with_snapshot(store: ImageStore, program_files: Path) -> ImageMeta:
    """An image whose files/ holds a copy of `program_files` as /data, as a checkpoint makes it
    (copied at CRIU's post-dump, before the seal)."""
    intent = INTENT.model_copy(update={"snapshot": ["/data"]})
    with store.begin("memcached", intent) as pending:
        for name, data in CRIU_FILES.items():
            (pending.criu_dir / name).write_bytes(data)
        take_snapshot({"/data": program_files}, pending.criu_dir.parent)
        return pending.commit(FACTS)


@pytest.fixture
def source(tmp_path: Path, program_files: Path) -> tuple[ImageStore, ImageMeta]:
    store = ImageStore(tmp_path / "a")
    return store, image_with_snapshot(store, program_files)


def files_dir(store: ImageStore, image: ImageMeta) -> Path:
    return store.image_dir(image) / "files"


def test_the_seal_records_every_snapshot_entry(source: tuple[ImageStore, ImageMeta]) -> None:
    _, image = source
    recorded = image.snapshot_files
    assert image.format_version == 3
    entry = snapshot_paths_entry(source)
    assert recorded[f"{entry}/sub/state.db"].size == 70000
    assert (recorded[f"{entry}/sub/state.db"].uid, recorded[f"{entry}/sub/state.db"].mode) == (
        NOBODY,
        0o640,
    )
    assert recorded[f"{entry}/link"].target == "/etc/hostname"
    assert recorded[f"{entry}/fifo"].kind == "fifo"
    assert recorded[f"{entry}"].mode == 0o1777
    assert recorded["manifest.json"].kind == "file"


def snapshot_paths_entry(source: tuple[ImageStore, ImageMeta]) -> str:
    store, image = source
    entry = snapshot_paths(store.image_dir(image))["/data"]
    assert entry is not None
    return entry


@pytest.mark.parametrize("encrypt", [True, False])
def test_round_trip_carries_the_snapshot_and_it_is_written_back(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path, encrypt: bool
) -> None:
    store, image = source
    target = ImageStore(tmp_path / "b")
    imported = receive(target, archive_of(store, image, encrypt=encrypt))
    assert imported == image
    target.verify(imported)
    restored = tmp_path / "restored"
    assert write_back(target.image_dir(imported), {"/data": restored}) == ["/data"]
    state = restored / "sub" / "state.db"
    assert state.read_bytes() == b"\x07" * 70000
    info = state.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert stat.S_IMODE(restored.stat().st_mode) == 0o1777
    assert os.readlink(restored / "link") == "/etc/hostname"
    assert stat.S_ISFIFO((restored / "fifo").lstat().st_mode)
    assert (restored / "empty").read_bytes() == b""


def test_progress_counts_the_snapshot_bytes(source: tuple[ImageStore, ImageMeta]) -> None:
    store, image = source
    seen: list[tuple[int, int]] = []
    write_archive(store, image, io.BytesIO(), progress=lambda d, t: seen.append((d, t)))
    total = sum(image.file_sizes.values()) + sum(e.size for e in image.snapshot_files.values())
    assert total > sum(image.file_sizes.values()) + 70000
    assert seen[-1] == (total, total)


def test_a_snapshot_file_changed_in_the_store_fails_verify(
    source: tuple[ImageStore, ImageMeta],
) -> None:
    store, image = source
    entry = snapshot_paths_entry(source)
    state = files_dir(store, image) / entry / "sub" / "state.db"
    state.write_bytes(b"\x08" * 70000)
    with pytest.raises(ImageCorrupt, match=rf"files/{entry}/sub/state.db does not match"):
        store.verify(image)
    state.unlink()
    with pytest.raises(ImageCorrupt, match=rf"files/{entry}/sub/state.db is missing"):
        store.verify(image)


def plain_members(store: ImageStore, image: ImageMeta) -> list[tarfile.TarInfo | bytes]:
    """The plain tar of `image` as written, member by member (TarInfo, then its data)."""
    data = archive_of(store, image, compress="none", encrypt=False)
    members: list[tarfile.TarInfo | bytes] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            members.append(member)
            extracted = tar.extractfile(member) if member.isreg() else None
            members.append(extracted.read() if extracted is not None else b"")
    return members


def tar_of(members: list[tarfile.TarInfo | bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in zip(members[::2], members[1::2], strict=True):
            assert isinstance(info, tarfile.TarInfo)
            assert isinstance(data, bytes)
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return zstandard.ZstdCompressor().compress(out.getvalue())


def member_index(members: list[tarfile.TarInfo | bytes], suffix: str) -> int:
    for index in range(0, len(members), 2):
        info = members[index]
        assert isinstance(info, tarfile.TarInfo)
        if info.name.endswith(suffix):
            return index
    raise AssertionError(f"no member ending {suffix}")


def test_an_altered_snapshot_file_is_refused_naming_it(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    members = plain_members(store, image)
    members[member_index(members, "state.db") + 1] = b"\x08" * 70000
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=r"files/.*/sub/state.db does not match its blake3"):
        receive(target, tar_of(members))
    assert leftovers(target) == []


def test_a_missing_snapshot_entry_is_refused(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    members = plain_members(store, image)
    index = member_index(members, "/fifo")
    del members[index : index + 2]
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=r"files/.*/fifo is missing from the archive"):
        receive(target, tar_of(members))
    assert leftovers(target) == []


def test_a_snapshot_entry_cannot_write_through_a_symlink(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    """A plain archive is anyone's to forge, meta.json included: an entry below a symlink
    would land wherever the symlink points."""
    store, image = source
    outside = tmp_path / "outside"
    outside.mkdir()
    members = plain_members(store, image)
    meta = json.loads(members[1])  # type: ignore[arg-type]
    entry = snapshot_paths_entry(source)
    link = meta["snapshot_files"][f"{entry}/link"]
    meta["snapshot_files"][f"{entry}/link"] = {**link, "target": str(outside)}
    meta["snapshot_files"][f"{entry}/link/planted"] = dict(meta["snapshot_files"]["manifest.json"])
    members[1] = json.dumps(meta).encode()
    link_index = member_index(members, "/link")
    link_member = members[link_index]
    assert isinstance(link_member, tarfile.TarInfo)
    link_member.linkname = str(outside)
    planted = tarfile.TarInfo(f"files/{entry}/link/planted")
    manifest = members[member_index(members, "manifest.json") + 1]
    members[link_index + 2 : link_index + 2] = [planted, manifest]
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match="is not inside a directory"):
        receive(target, tar_of(members))
    assert list(outside.iterdir()) == []
    assert leftovers(target) == []


def test_an_image_with_unrecorded_snapshot_files_is_not_exported(
    source: tuple[ImageStore, ImageMeta],
) -> None:
    """Images sealed before snapshot files were recorded (format_version 2)."""
    store, image = source
    meta_path = store.image_dir(image) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 2
    del meta["snapshot_files"]
    meta_path.write_text(json.dumps(meta))
    (old,) = store.list("memcached")
    store.verify(old)  # its files/ is not checked: nothing records it
    with pytest.raises(ArchiveRefused, match=r"does not record .* checkpoint the program again"):
        write_archive(store, old, io.BytesIO())
    with pytest.raises(ArchiveRefused, match="does not record"):
        ArchiveStream(store, old, None)
