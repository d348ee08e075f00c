"""The upload queue across a killed supervisor: an image is queued before it is listed, a dump
a killed supervisor left sealing is queued when the next one lists it, and an entry whose
image is still being sealed waits for it instead of being dropped (found by the chaos
harness's remote mode: images made around a kill never reached the object store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyrage
import pytest
import trio

from grenadine_sv.config.models import EncryptionSettings, ProgramConfig, RemoteSettings
from grenadine_sv.store.images import ImageMeta, ImageStore
from grenadine_sv.supervisor.remote import RemoteImages
from tests.unit.test_images import CRIU_FILES, FACTS, INTENT

KEY = pyrage.x25519.Identity.generate()


def program(name: str, *, upload: bool) -> ProgramConfig:
    return ProgramConfig.model_validate(
        {
            "name": name,
            "command": ["/bin/true"],
            "source": Path("/etc/x.toml"),
            "checkpoint": {"upload": upload},
        }
    )


def remote_images(store: ImageStore, *configs: ProgramConfig) -> RemoteImages:
    settings = RemoteSettings(
        url="s3://bucket/prefix",
        encryption=EncryptionSettings(recipients=[str(KEY.to_public())]),
    )

    def no_store(settings: Any) -> Any:
        raise AssertionError("these tests reach no object store")

    return RemoteImages(
        settings,
        store,
        lambda: {c.name: c for c in configs},
        lambda config: pytest.fail("no definition is needed"),
        store_factory=no_store,
    )


def seal_without_listing(store: ImageStore, name: str) -> str:
    """What a supervisor killed after sealing a dump, before listing it, leaves."""
    pending = store.begin(name, INTENT)
    for file, data in CRIU_FILES.items():
        (pending.criu_dir / file).write_bytes(data)
    return pending.seal(FACTS).id


def test_a_dump_left_sealing_by_a_killed_supervisor_is_queued_when_listed(
    tmp_path: Path,
) -> None:
    store = ImageStore(tmp_path / "state")
    sealed = seal_without_listing(store, "uploads")
    seal_without_listing(store, "local-only")
    recovered = store.recover_partials()
    assert sorted(m.program for m in recovered.completed) == ["local-only", "uploads"]

    remote = remote_images(
        store, program("uploads", upload=True), program("local-only", upload=False)
    )
    remote.load_queue(recovered.completed)
    assert [(e.program, e.image_id) for e in remote.queue.entries] == [("uploads", sealed)]
    again = remote_images(store, program("uploads", upload=True))
    again.load_queue()
    assert [e.image_id for e in again.queue.entries] == [sealed], "the queue is on disk"


def test_an_image_is_queued_before_it_is_listed(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    remote = remote_images(store, program("uploads", upload=True))
    config = program("uploads", upload=True)
    seen_in_queue: list[bool] = []

    def queue(meta: ImageMeta) -> None:
        remote.image_sealed(config, meta)
        listed = [m.id for m in store.list("uploads")]
        seen_in_queue.append(meta.id in remote.queue.ids_of("uploads") and meta.id not in listed)

    with store.begin("uploads", INTENT) as pending:
        for file, data in CRIU_FILES.items():
            (pending.criu_dir / file).write_bytes(data)
        image = pending.commit(FACTS, before_publish=queue)
    assert seen_in_queue == [True]
    assert store.list("uploads") == [image]


async def test_an_entry_whose_image_is_still_being_sealed_waits_for_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state")
    remote = remote_images(store, program("uploads", upload=True))
    pending = store.begin("uploads", INTENT)
    remote.queue.add("uploads", pending.id)
    remote.clock = lambda: 1000.0
    with trio.move_on_after(5):
        await remote._upload(remote.queue.entries[0])
    assert [e.image_id for e in remote.queue.entries] == [pending.id], "not dropped"
    assert remote.queue.entries[0].not_before > 1000.0
    assert remote.queue.entries[0].attempts == 0

    pending.abort()  # the dump failed: now the entry names no image, and goes
    await remote._upload(remote.queue.entries[0])
    assert remote.queue.entries == []


class RecordingStore:
    """Stands in for the object store (the integration tests use SeaweedFS): records what
    is uploaded."""

    def __init__(self) -> None:
        self.uploaded: list[str] = []

    def upload(self, image: ImageMeta, source: Any) -> None:
        while source.read(1 << 20):
            pass
        self.uploaded.append(image.id)


async def test_an_image_queued_by_any_dump_wakes_the_uploader(tmp_path: Path) -> None:
    """A take-back's dump queues its image in a worker thread, not through a checkpoint's
    end: the uploader must not wait for the next checkpoint to notice it."""
    store = ImageStore(tmp_path / "state")
    config = program("uploads", upload=True)
    recording = RecordingStore()
    remote = remote_images(store, config)
    remote._store_factory = lambda settings: recording  # type: ignore[assignment,return-value]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote.run_uploads)
        await trio.sleep(0)  # the uploader waits for work

        def dump() -> ImageMeta:
            with store.begin("uploads", INTENT) as pending:
                for file, data in CRIU_FILES.items():
                    (pending.criu_dir / file).write_bytes(data)
                return pending.commit(
                    FACTS, before_publish=lambda meta: remote.image_sealed(config, meta)
                )

        image = await trio.to_thread.run_sync(dump)
        with trio.fail_after(10):
            while recording.uploaded != [image.id]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def committed(store: ImageStore, name: str) -> ImageMeta:
    with store.begin(name, INTENT) as pending:
        for file, data in CRIU_FILES.items():
            (pending.criu_dir / file).write_bytes(data)
        return pending.commit(FACTS)


async def test_an_upload_that_succeeds_ends_the_backoff_of_the_others(tmp_path: Path) -> None:
    """After an outage every queued upload waits out its own backoff (up to 30 s): once the
    store takes one, the others go at once instead (seen in the store-down test: an image
    waited 13 s more after the store was back)."""
    store = ImageStore(tmp_path / "state")
    config = program("uploads", upload=True)
    waiting, due = committed(store, "uploads"), committed(store, "uploads")
    recording = RecordingStore()
    remote = remote_images(store, config)
    remote._store_factory = lambda settings: recording  # type: ignore[assignment,return-value]
    remote.queue.add("uploads", waiting.id)
    remote.queue.add("uploads", due.id)
    backed_off = remote.queue.entries[0]
    backed_off.attempts, backed_off.not_before = 6, remote.clock() + 30.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote.run_uploads)
        with trio.fail_after(10):
            while len(recording.uploaded) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert recording.uploaded == [due.id, waiting.id]
    assert remote.queue.entries == []
