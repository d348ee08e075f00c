"""Image archives: round trips, and every way an archive is refused leaves nothing behind."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest
import zstandard

from grenadine_sv.store.archive import (
    ArchiveRefused,
    Compression,
    acceptance,
    read_archive,
    write_archive,
)
from grenadine_sv.store.definition import CurrentDefinition, record_definition
from grenadine_sv.store.encryption import EncryptionKeyError, load_identities
from grenadine_sv.store.images import ImageMeta, ImageStore
from tests.unit.test_images import make_image

KEY = pyrage.x25519.Identity.generate()
OTHER_KEY = pyrage.x25519.Identity.generate()


def accept_all(meta: ImageMeta) -> None:
    pass


def archive_of(
    store: ImageStore, image: ImageMeta, compress: Compression = "zstd", encrypt: bool = True
) -> bytes:
    sink = io.BytesIO()
    recipients = [KEY.to_public()] if encrypt else None
    write_archive(store, image, sink, compress=compress, recipients=recipients)
    return sink.getvalue()


def receive(
    store: ImageStore,
    data: bytes,
    identities: list[object] | None = None,
    accept: Callable[[ImageMeta], None] = accept_all,
) -> ImageMeta:
    source = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
    return read_archive(store, source, identities=identities or [KEY], accept=accept, progress=None)


def leftovers(store: ImageStore, program: str = "memcached") -> list[str]:
    directory = store.root / program
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@pytest.fixture
def source(tmp_path: Path) -> tuple[ImageStore, ImageMeta]:
    store = ImageStore(tmp_path / "a")
    return store, make_image(store)


@pytest.mark.parametrize("compress", ["zstd", "none"])
@pytest.mark.parametrize("encrypt", [True, False])
def test_round_trip_keeps_every_file_and_the_meta(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path, compress: Compression, encrypt: bool
) -> None:
    store, image = source
    data = archive_of(store, image, compress, encrypt)
    assert data.startswith(b"age-encryption.org/v1") == encrypt
    target = ImageStore(tmp_path / "b")
    imported = receive(target, data)
    assert imported == image
    assert target.list("memcached") == [image]
    target.verify(imported)
    for rel in image.checksums:
        assert (target.criu_dir(imported) / rel).read_bytes() == (
            store.criu_dir(image) / rel
        ).read_bytes()
    assert oct(os.stat(target.criu_dir(imported) / "pstree.img").st_mode & 0o777) == "0o600"


def test_progress_reaches_the_total(source: tuple[ImageStore, ImageMeta]) -> None:
    store, image = source
    seen: list[tuple[int, int]] = []
    write_archive(store, image, io.BytesIO(), progress=lambda d, t: seen.append((d, t)))
    total = sum(image.file_sizes.values())
    assert seen[-1] == (total, total)


def test_an_image_already_here_is_refused(source: tuple[ImageStore, ImageMeta]) -> None:
    store, image = source
    with pytest.raises(ArchiveRefused, match="already has image"):
        receive(store, archive_of(store, image))


def test_wrong_key_is_refused_with_a_sentence_saying_so(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=r"could not be decrypted.*other recipients"):
        receive(target, archive_of(store, image), identities=[OTHER_KEY])
    assert leftovers(target) == []


def test_encrypted_archive_without_identity_is_refused(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    source_stream = io.BufferedReader(io.BytesIO(archive_of(store, image)))  # type: ignore[arg-type]
    with pytest.raises(ArchiveRefused, match=r"no .* identity_file"):
        read_archive(ImageStore(tmp_path / "b"), source_stream, identities=None, accept=accept_all)


@pytest.mark.parametrize("where", [0.5, 0.999])
def test_tampered_encrypted_archive_is_refused(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path, where: float
) -> None:
    store, image = source
    data = bytearray(archive_of(store, image))
    data[int(len(data) * where)] ^= 0x01
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=r"failed age authentication|damaged"):
        receive(target, bytes(data))
    assert leftovers(target) == []


def test_truncated_encrypted_archive_is_refused(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    data = archive_of(store, image)
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused):
        receive(target, data[: len(data) - 20])
    assert leftovers(target) == []


def tar_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def plain_members(store: ImageStore, image: ImageMeta) -> dict[str, bytes]:
    members = {"meta.json": (store.image_dir(image) / "meta.json").read_bytes()}
    for rel in sorted(image.checksums):
        members[f"criu/{rel}"] = (store.criu_dir(image) / rel).read_bytes()
    return members


def test_altered_file_in_a_plain_archive_is_refused_naming_it(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source
    members = plain_members(store, image)
    members["criu/pages-1.img"] = b"\x02" * 5000
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=r"criu/pages-1.img does not match its blake3"):
        receive(target, zstandard.ZstdCompressor().compress(tar_of(members)))
    assert leftovers(target) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("criu/core-1.img"), "core-1.img is missing"),
        (lambda m: m.__setitem__("criu/extra.img", b"x"), "does not list"),
        (lambda m: m.__setitem__("../escape", b"x"), "does not list"),
        (lambda m: m.pop("meta.json"), "does not start with meta.json"),
    ],
)
def test_archives_that_do_not_match_their_meta_are_refused(
    source: tuple[ImageStore, ImageMeta],
    tmp_path: Path,
    change: Callable[[dict[str, bytes]], object],
    message: str,
) -> None:
    store, image = source
    members = plain_members(store, image)
    change(members)
    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match=message):
        receive(target, tar_of(members))
    assert leftovers(target) == []
    assert not (tmp_path / "escape").exists()


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveRefused, match="not an image archive"):
        receive(ImageStore(tmp_path / "b"), b"hello, this is not a tar file" * 40)


def test_acceptance_refusal_comes_before_any_file_is_written(
    source: tuple[ImageStore, ImageMeta], tmp_path: Path
) -> None:
    store, image = source

    def refuse(meta: ImageMeta) -> None:
        raise ArchiveRefused(f"no program {meta.program}")

    target = ImageStore(tmp_path / "b")
    with pytest.raises(ArchiveRefused, match="no program memcached"):
        receive(target, archive_of(store, image), accept=refuse)
    assert leftovers(target) == []


def test_acceptance_names_what_changed_in_the_definition(
    source: tuple[ImageStore, ImageMeta],
) -> None:
    _, image = source
    then = CurrentDefinition(fields={"command": ["memcached"]}, environment={}, digest="a")
    recorded = image.model_copy(
        update={"definition": record_definition(then), "definition_digest": "a"}
    )
    now = CurrentDefinition(
        fields={"command": ["memcached", "-p", "1"]}, environment={}, digest="b"
    )
    acceptance(lambda name: then, "here", allow_changed=False)(recorded)
    acceptance(lambda name: now, "here", allow_changed=True)(recorded)
    with pytest.raises(ArchiveRefused, match=r"another definition .*command: \["):
        acceptance(lambda name: now, "here", allow_changed=False)(recorded)
    with pytest.raises(ArchiveRefused, match="which here does not define"):
        acceptance(lambda name: None, "here", allow_changed=True)(recorded)


def test_identity_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "key.txt"
    path.write_text(f"# created by a test\n{KEY}\n")
    os.chmod(path, 0o644)
    with pytest.raises(EncryptionKeyError, match=r"mode 0644.*must be 0600"):
        load_identities(path)
    os.chmod(path, 0o600)
    assert len(load_identities(path)) == 1
    path.write_text("not a key\n")
    with pytest.raises(EncryptionKeyError, match="line 1 is not an age identity"):
        load_identities(path)
