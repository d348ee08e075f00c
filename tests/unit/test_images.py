"""The image store: atomic publication, lookup by reference, integrity checks, retention."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import blake3
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from grenadine_sv import __version__
from grenadine_sv.cli.formatting import format_bytes
from grenadine_sv.criu.facts import DumpFacts
from grenadine_sv.store.images import (
    AmbiguousImage,
    DumpIntent,
    ImageCorrupt,
    ImageMeta,
    ImageNotFound,
    ImageStore,
    PendingImage,
    Trigger,
    current_boot_id,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FACTS = DumpFacts(
    root_pid=1,
    comm="memcached",
    memory_bytes=1_880_000,
    stdio_pipes={"stdout": 1234, "stderr": 1235},
    dump_stats={"frozen_time": 1500, "pages_written": 459},
)
INTENT = DumpIntent(
    trigger="manual",
    criu_version="4.2.1",
    definition_digest="d" * 64,
    leave_running=True,
    source_pid=4321,
    source_start_time=99,
    boot_id=current_boot_id(),
)
CRIU_FILES = {"pstree.img": b"tree", "pages-1.img": b"\x01" * 5000, "core-1.img": b"core"}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "state")


def commit(pending: PendingImage) -> ImageMeta:
    return pending.commit(FACTS)


def make_image(
    store: ImageStore,
    program: str = "memcached",
    *,
    minutes: int = 0,
    trigger: Trigger = "manual",
) -> ImageMeta:
    with store.begin(program, INTENT.model_copy(update={"trigger": trigger})) as pending:
        for name, data in CRIU_FILES.items():
            (pending.criu_dir / name).write_bytes(data)
        return pending.commit(FACTS, created=T0 + timedelta(minutes=minutes))


@pytest.fixture
def chosen_ids(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the next images get the ids appended to the yielded list, in order."""
    ids: list[str] = []
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(hex=ids.pop(0)))
    return ids


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- commit and list ---------------------------------------------------------------------


def test_committed_image_is_listed_with_its_facts(store: ImageStore) -> None:
    meta = make_image(store)

    assert store.list("memcached") == [meta]
    assert meta.program == "memcached"
    assert len(meta.id) == 32
    assert meta.created == T0
    assert meta.comm == "memcached"
    assert meta.stdio_pipes == {"stdout": 1234, "stderr": 1235}
    assert meta.dump_stats["frozen_time"] == 1500
    assert meta.image_bytes == sum(len(d) for d in CRIU_FILES.values())
    assert set(meta.checksums) == set(CRIU_FILES)
    assert meta.grenadine_version == __version__
    assert store.criu_dir(meta) == store.root / "memcached" / meta.id / "criu"
    assert (store.criu_dir(meta) / "pstree.img").read_bytes() == b"tree"


def test_meta_json_stores_created_as_utc_iso(store: ImageStore) -> None:
    meta = make_image(store)
    raw = json.loads((store.root / "memcached" / meta.id / "meta.json").read_text())
    assert raw["created"] == "2024-05-01T12:00:00Z"


def test_created_in_another_zone_is_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    meta = _meta_with(created=datetime(2024, 5, 1, 14, 0, tzinfo=plus_two))
    assert meta.created == T0
    assert meta.created.utcoffset() == timedelta(0)


def test_naive_created_is_rejected() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        _meta_with(created=datetime(2024, 5, 1, 12, 0))


def test_unknown_meta_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _meta_with(surprise=1)


def test_list_is_newest_first_per_program(store: ImageStore) -> None:
    old = make_image(store, minutes=0)
    new = make_image(store, minutes=10)
    middle = make_image(store, minutes=5)
    other = make_image(store, "redis", minutes=99)

    assert store.list("memcached") == [new, middle, old]
    assert store.list() == [new, middle, old, other]
    assert store.programs() == ["memcached", "redis"]


def test_list_of_unknown_program_is_empty(store: ImageStore) -> None:
    assert store.list("nothing") == []
    assert store.programs() == []


def test_second_commit_is_refused(store: ImageStore) -> None:
    with store.begin("memcached", INTENT) as pending:
        commit(pending)
        with pytest.raises(RuntimeError, match="already committed"):
            commit(pending)
    assert len(store.list("memcached")) == 1


def test_commit_refuses_a_symlink_and_leaves_nothing(store: ImageStore) -> None:
    pending = store.begin("memcached", INTENT)
    (pending.criu_dir / "parent").symlink_to("/etc")
    with pytest.raises(ValueError, match="only regular files"):
        commit(pending)
    assert store.list() == []
    assert list((store.root / "memcached").iterdir()) == []


# --- abort and interrupted dumps -----------------------------------------------------------


def test_abort_leaves_nothing(store: ImageStore) -> None:
    pending = store.begin("memcached", INTENT)
    (pending.criu_dir / "pages-1.img").write_bytes(b"x")
    pending.abort()

    assert store.list() == []
    assert list((store.root / "memcached").iterdir()) == []


def test_exception_inside_begin_block_leaves_nothing(store: ImageStore) -> None:
    def dump_that_fails() -> None:
        with store.begin("memcached", INTENT) as pending:
            (pending.criu_dir / "pages-1.img").write_bytes(b"x")
            raise OSError("criu failed")

    with pytest.raises(OSError, match="criu failed"):
        dump_that_fails()

    assert store.list() == []
    assert list((store.root / "memcached").iterdir()) == []


def test_uncommitted_pending_is_not_listed_or_resolvable(store: ImageStore) -> None:
    pending = store.begin("memcached", INTENT)
    (pending.criu_dir / "pages-1.img").write_bytes(b"x")

    assert store.list("memcached") == []
    with pytest.raises(ImageNotFound):
        store.resolve("memcached", pending.id)
    pending.abort()


def test_recover_partials_removes_unfinished_dumps_and_deletes(store: ImageStore) -> None:
    kept = make_image(store)
    store.begin("memcached", INTENT)  # CRIU never finished this one: no stats-dump
    store.begin("redis", INTENT)
    deleting = store.root / "redis" / f".deleting-{'e' * 32}"
    (deleting / "criu").mkdir(parents=True)
    no_intent = store.root / "redis" / f".partial-{'f' * 32}"
    (no_intent / "criu").mkdir(parents=True)

    recovered = store.recover_partials()

    assert recovered.completed == []
    assert len(recovered.removed) == 4
    assert store.list() == [kept]
    assert [p.name for p in (store.root / "memcached").iterdir()] == [kept.id]
    assert list((store.root / "redis").iterdir()) == []


def finished_dump(store: ImageStore, intent: DumpIntent = INTENT) -> PendingImage:
    """A partial image whose dump CRIU finished, as a supervisor killed before listing it
    leaves it (real CRIU files are read by recovery: these come from a fake reader)."""
    pending = store.begin("memcached", intent)
    for name, data in CRIU_FILES.items():
        (pending.criu_dir / name).write_bytes(data)
    (pending.criu_dir / "stats-dump").write_bytes(b"stats")
    return pending


@pytest.fixture
def fake_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycriu cannot decode the made-up files above: recovery reads FACTS instead."""
    monkeypatch.setattr("grenadine_sv.store.pending.read_dump_facts", lambda _dir, **_: FACTS)


def test_recover_partials_completes_a_finished_dump(store: ImageStore, fake_facts: None) -> None:
    pending = finished_dump(store, INTENT.model_copy(update={"leave_running": False}))

    recovered = store.recover_partials()

    assert [m.id for m in recovered.completed] == [pending.id]
    (image,) = store.list("memcached")
    assert image.id == pending.id
    assert image.froze(INTENT.source_pid, INTENT.source_start_time)
    store.verify(image)


def test_recover_partials_lists_a_sealed_dump_interrupted_before_its_rename(
    store: ImageStore, fake_facts: None
) -> None:
    pending = finished_dump(store)
    sealed = pending.seal(FACTS)

    recovered = store.recover_partials()

    assert recovered.completed == [sealed]
    assert store.list("memcached") == [sealed]


def test_recover_partials_reseals_a_dump_whose_meta_was_torn(
    store: ImageStore, fake_facts: None
) -> None:
    pending = finished_dump(store)
    (pending.criu_dir.parent / "meta.json").write_text('{"id": "')

    recovered = store.recover_partials()

    assert [m.id for m in recovered.completed] == [pending.id]
    store.verify(store.list("memcached")[0])


def test_recover_partials_does_not_trust_an_unsealed_dump_from_before_a_reboot(
    store: ImageStore, fake_facts: None
) -> None:
    finished_dump(store, INTENT.model_copy(update={"boot_id": "another boot"}))

    recovered = store.recover_partials()

    assert recovered.completed == []
    assert "rebooted" in recovered.removed[0][1]
    assert store.list() == []


# --- resolve -------------------------------------------------------------------------------


def test_resolve_by_full_id_prefix_idx_and_latest(store: ImageStore) -> None:
    old = make_image(store, minutes=0)
    new = make_image(store, minutes=1)

    assert store.resolve("memcached", old.id) == old
    assert store.resolve("memcached", old.id[:6]) == old
    assert store.resolve("memcached", old.id.upper()) == old
    assert store.resolve("memcached", "0") == new
    assert store.resolve("memcached", "1") == old
    assert store.resolve("memcached", "latest") == new


def test_resolve_ambiguous_prefix_names_the_candidates(
    store: ImageStore, chosen_ids: list[str]
) -> None:
    chosen_ids += ["abcd1" + "0" * 27, "abcd2" + "0" * 27]
    first = make_image(store, minutes=0)
    second = make_image(store, minutes=1)

    with pytest.raises(AmbiguousImage, match="matches 2 images") as info:
        store.resolve("memcached", "abcd")
    assert first.id in str(info.value)
    assert second.id in str(info.value)
    assert store.resolve("memcached", "abcd2") == second


def test_resolve_decimal_ref_that_is_both_idx_and_prefix(
    store: ImageStore, chosen_ids: list[str]
) -> None:
    chosen_ids += ["1000" + "a" * 28, "2000" + "b" * 28]
    by_prefix = make_image(store, minutes=0)
    make_image(store, minutes=1)

    # "1000" is no IDX here (only 2 images): it can only be the prefix.
    assert store.resolve("memcached", "1000") == by_prefix


def test_resolve_not_found_messages_are_actionable(store: ImageStore) -> None:
    with pytest.raises(ImageNotFound, match="'memcached' has no images"):
        store.resolve("memcached", "latest")

    make_image(store)
    with pytest.raises(ImageNotFound, match=r"no image '5'.*IDX 0 to 0"):
        store.resolve("memcached", "5")
    with pytest.raises(ImageNotFound, match="no image 'ffffffff'"):
        store.resolve("memcached", "ffffffff")
    with pytest.raises(ImageNotFound, match="at least 4 characters"):
        store.resolve("memcached", "abc")
    with pytest.raises(ImageNotFound, match="no image '-1'"):
        store.resolve("memcached", "-1")


# --- modes ---------------------------------------------------------------------------------


def test_directories_are_0700_and_files_0600(store: ImageStore) -> None:
    old_umask = os.umask(0o022)
    try:
        with store.begin("memcached", INTENT) as pending:
            pages = pending.criu_dir / "pages-1.img"
            pages.write_bytes(b"secret")
            pages.chmod(0o644)  # as CRIU leaves them
            sub = pending.criu_dir / "sub"
            sub.mkdir(mode=0o755)
            (sub / "x.img").write_bytes(b"x")
            meta = commit(pending)
    finally:
        os.umask(old_umask)

    image_dir = store.root / "memcached" / meta.id
    for directory in (store.root, store.root / "memcached", image_dir, image_dir / "criu"):
        assert mode_of(directory) == 0o700, directory
    assert mode_of(image_dir / "criu" / "sub") == 0o700
    for file in (image_dir / "meta.json", image_dir / "criu" / "pages-1.img"):
        assert mode_of(file) == 0o600, file
    assert mode_of(image_dir / "criu" / "sub" / "x.img") == 0o600
    assert meta.checksums.keys() == {"pages-1.img", "sub/x.img"}


def test_pending_criu_dir_is_private_before_criu_writes(store: ImageStore) -> None:
    with store.begin("memcached", INTENT) as pending:
        assert mode_of(pending.criu_dir) == 0o700
        assert mode_of(pending.criu_dir.parent) == 0o700


# --- verify --------------------------------------------------------------------------------


def test_verify_accepts_an_intact_image(store: ImageStore) -> None:
    store.verify(make_image(store))


def test_verify_detects_a_flipped_byte(store: ImageStore) -> None:
    meta = make_image(store)
    pages = store.criu_dir(meta) / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[1234] ^= 0x01
    pages.write_bytes(bytes(data))

    with pytest.raises(ImageCorrupt, match=r"criu/pages-1\.img does not match its blake3") as e:
        store.verify(meta)
    assert e.value.path == "criu/pages-1.img"
    assert meta.id in str(e.value)
    assert "'memcached'" in str(e.value)


def test_new_images_carry_blake3_digests(store: ImageStore) -> None:
    meta = make_image(store)
    assert meta.checksum_algorithm == "blake3"
    assert meta.checksums["pages-1.img"] == blake3.blake3(CRIU_FILES["pages-1.img"]).hexdigest()


def _as_old_sha256_image(store: ImageStore, meta: ImageMeta) -> ImageMeta:
    """Rewrite `meta` as images made before BLAKE3 were: SHA-256 digests, no algorithm key."""
    meta_path = store.root / meta.program / meta.id / "meta.json"
    raw = json.loads(meta_path.read_text())
    del raw["checksum_algorithm"]
    raw["checksums"] = {
        rel: hashlib.sha256((store.criu_dir(meta) / rel).read_bytes()).hexdigest()
        for rel in raw["checksums"]
    }
    meta_path.write_text(json.dumps(raw))
    [old] = store.list(meta.program)
    return old


def test_old_images_with_sha256_digests_still_verify(store: ImageStore) -> None:
    old = _as_old_sha256_image(store, make_image(store))
    assert old.checksum_algorithm == "sha256"

    store.verify(old)


def test_old_images_with_sha256_digests_detect_a_flipped_byte(store: ImageStore) -> None:
    old = _as_old_sha256_image(store, make_image(store))
    pages = store.criu_dir(old) / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[10] ^= 0x80
    pages.write_bytes(bytes(data))

    with pytest.raises(ImageCorrupt, match=r"pages-1\.img does not match its sha256"):
        store.verify(old)


def test_verify_can_leave_page_files_to_a_lazy_restore(store: ImageStore) -> None:
    meta = make_image(store)
    pages = store.criu_dir(meta) / "pages-1.img"
    pages.write_bytes(b"\x02" * len(CRIU_FILES["pages-1.img"]))  # same size, other bytes

    store.verify(meta, skip=lambda rel: rel.startswith("pages-"))
    with pytest.raises(ImageCorrupt, match=r"pages-1\.img does not match"):
        store.verify_file(meta, "pages-1.img")


def test_verify_detects_a_truncated_file(store: ImageStore) -> None:
    meta = make_image(store)
    with (store.criu_dir(meta) / "pages-1.img").open("r+b") as file:
        file.truncate(4096)

    with pytest.raises(ImageCorrupt, match=r"pages-1\.img has 4096 bytes, expected 5000"):
        store.verify(meta)


def test_verify_detects_a_missing_file(store: ImageStore) -> None:
    meta = make_image(store)
    (store.criu_dir(meta) / "core-1.img").unlink()

    with pytest.raises(ImageCorrupt, match=r"criu/core-1\.img is missing"):
        store.verify(meta)


def test_verify_detects_an_extra_file(store: ImageStore) -> None:
    meta = make_image(store)
    (store.criu_dir(meta) / "stats-restore").write_bytes(b"x")

    with pytest.raises(ImageCorrupt, match=r"criu/stats-restore was not part of the dump"):
        store.verify(meta)


def test_verify_detects_a_missing_criu_dir(store: ImageStore) -> None:
    meta = make_image(store)
    for file in store.criu_dir(meta).iterdir():
        file.unlink()
    store.criu_dir(meta).rmdir()

    with pytest.raises(ImageCorrupt, match="criu/ is missing"):
        store.verify(meta)


# --- delete and prune ----------------------------------------------------------------------


def test_delete_removes_the_image(store: ImageStore) -> None:
    gone = make_image(store, minutes=0)
    kept = make_image(store, minutes=1)

    store.delete(gone)

    assert store.list("memcached") == [kept]
    assert [p.name for p in (store.root / "memcached").iterdir()] == [kept.id]
    with pytest.raises(ImageNotFound, match="already deleted"):
        store.delete(gone)


def test_prune_keeps_the_newest(store: ImageStore) -> None:
    images = [make_image(store, minutes=m) for m in range(5)]

    deleted = store.prune("memcached", keep=2)

    assert deleted == [images[2], images[1], images[0]]
    assert store.list("memcached") == [images[4], images[3]]


def test_prune_never_deletes_the_newest_pre_deploy_image(store: ImageStore) -> None:
    old_deploy = make_image(store, minutes=0, trigger="pre-deploy")
    deploy = make_image(store, minutes=1, trigger="pre-deploy")
    after = [make_image(store, minutes=m, trigger="interval") for m in range(2, 6)]

    deleted = store.prune("memcached", keep=2)

    # The newest pre-deploy image is kept on top of the 2 newest, and does not count.
    assert store.list("memcached") == [after[3], after[2], deploy]
    assert deleted == [after[1], after[0], old_deploy]
    assert store.prune("memcached", keep=0) == [after[3], after[2]]
    assert store.list("memcached") == [deploy]


def test_prune_leaves_other_programs_alone(store: ImageStore) -> None:
    other = make_image(store, "redis")
    make_image(store, "memcached")
    store.prune("memcached", keep=0)
    assert store.list() == [other]


def test_prune_rejects_negative_keep(store: ImageStore) -> None:
    with pytest.raises(ValueError, match="keep must be 0 or more"):
        store.prune("memcached", keep=-1)


# --- robustness ----------------------------------------------------------------------------


def test_list_skips_a_broken_meta_json_and_logs_it(store: ImageStore) -> None:
    good = make_image(store, minutes=0)
    broken = make_image(store, minutes=1)
    (store.root / "memcached" / broken.id / "meta.json").write_text("{not json")

    with capture_logs() as logs:
        assert store.list("memcached") == [good]

    assert [entry["event"] for entry in logs] == ["image_skipped"]
    assert broken.id in logs[0]["path"]
    assert "bad meta.json" in logs[0]["reason"]


def test_list_skips_dirs_without_meta_or_with_a_foreign_meta(store: ImageStore) -> None:
    good = make_image(store, minutes=0)
    (store.root / "memcached" / ("0" * 32)).mkdir()
    copied = store.root / "memcached" / ("1" * 32)
    copied.mkdir()
    (copied / "meta.json").write_bytes(
        (store.root / "memcached" / good.id / "meta.json").read_bytes()
    )
    (store.root / "memcached" / "notes").mkdir()

    with capture_logs() as logs:
        assert store.list("memcached") == [good]
    reasons = sorted(entry["reason"] for entry in logs)
    assert reasons[0].startswith("meta.json names image")
    assert reasons[1] == "no meta.json"


@pytest.mark.parametrize("program", ["", ".", "..", "../etc", "a/b", "/abs", ".partial-x", "a\0b"])
def test_program_names_that_could_escape_are_rejected(store: ImageStore, program: str) -> None:
    with pytest.raises(ValueError, match="cannot name an image directory"):
        store.begin(program, INTENT)
    with pytest.raises(ValueError, match="cannot name an image directory"):
        store.list(program)
    with pytest.raises(ValueError, match="cannot name an image directory"):
        store.resolve(program, "latest")
    assert not (store.state_dir / "etc").exists()


@pytest.mark.parametrize("image_id", ["../../etc", "A" * 32, "0" * 31, "g" * 32, ""])
def test_image_ids_that_are_not_hex_are_rejected(image_id: str) -> None:
    with pytest.raises(ValidationError, match="32 lowercase hexadecimal"):
        _meta_with(id=image_id)


def test_criu_dir_refuses_an_unvalidated_escaping_meta(store: ImageStore) -> None:
    meta = _meta_with().model_copy(update={"id": "../../../etc"})
    with pytest.raises(ValueError, match="32 lowercase hexadecimal"):
        store.criu_dir(meta)


# --- figures -------------------------------------------------------------------------------


def test_usage_counts_images_and_their_bytes(store: ImageStore) -> None:
    assert store.usage("memcached") == (0, 0)
    first = make_image(store, minutes=0)
    make_image(store, minutes=1)
    store.begin("memcached", INTENT)  # partial dumps are not counted

    count, size = store.usage("memcached")
    meta_size = (store.root / "memcached" / first.id / "meta.json").stat().st_size
    assert count == 2
    assert size >= 2 * (first.image_bytes + meta_size) - 10
    assert size <= 2 * (first.image_bytes + meta_size) + 10


def test_free_bytes_works_before_the_state_dir_exists(store: ImageStore) -> None:
    assert not store.state_dir.exists()
    assert store.free_bytes() > 0


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.00KiB"),
        (1_880_000, "1.79MiB"),
        (3 << 30, "3.00GiB"),
        (5 << 40, "5.00TiB"),
        (5 << 50, "5120.00TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_bytes(-1)


def _meta_with(**changes: object) -> ImageMeta:
    fields: dict[str, object] = {
        "id": "a" * 32,
        "program": "memcached",
        "created": T0,
        "trigger": "manual",
        "comm": "memcached",
        "root_pid": 1,
        "memory_bytes": 1,
        "image_bytes": 1,
        "criu_version": "4.2.1",
        "definition_digest": "x",
        "stdio_pipes": {},
        "dump_stats": {},
        "leave_running": True,
        "checksums": {},
        "file_sizes": {},
        "grenadine_version": __version__,
    }
    fields.update(changes)
    return ImageMeta.model_validate(fields)
