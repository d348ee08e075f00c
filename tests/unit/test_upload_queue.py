"""The upload queue: persisted across supervisors, backoff, what it pins against pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

from grenadine_sv.supervisor.remote import (
    BACKOFF_MAX_SECONDS,
    QueuedUpload,
    UploadQueue,
    backoff_seconds,
)


def test_backoff_doubles_up_to_a_bound() -> None:
    assert [backoff_seconds(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff_seconds(0) == 0.0
    assert backoff_seconds(50) == BACKOFF_MAX_SECONDS


def test_queue_survives_a_new_supervisor_and_is_private(tmp_path: Path) -> None:
    queue = UploadQueue(tmp_path)
    assert queue.add("redis", "a" * 32)
    assert not queue.add("redis", "a" * 32)
    queue.add("memcached", "b" * 32)
    queue.entries[0].attempts = 3
    queue.save()
    assert os.stat(queue.path).st_mode & 0o777 == 0o600

    again = UploadQueue(tmp_path)
    again.load()
    assert again.entries == [
        QueuedUpload("redis", "a" * 32, attempts=3),
        QueuedUpload("memcached", "b" * 32),
    ]
    assert again.ids_of("redis") == {"a" * 32}
    again.remove(again.entries[0])
    assert again.ids_of("redis") == set()


def test_unreadable_queue_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "upload-queue.json").write_text("{not json")
    queue = UploadQueue(tmp_path)
    queue.load()
    assert queue.entries == []
    (tmp_path / "upload-queue.json").write_text(json.dumps({"uploads": [{"x": 1}]}))
    queue.load()
    assert queue.entries == []


def test_images_waiting_for_upload_are_never_pruned(tmp_path: Path) -> None:
    from grenadine_sv.store.images import ImageStore
    from tests.unit.test_images import make_image

    store = ImageStore(tmp_path)
    oldest, middle, newest = (make_image(store, "redis", minutes=m) for m in (0, 1, 2))
    deleted = store.prune("redis", 1, in_use={oldest.id})
    assert deleted == [middle]
    assert [m.id for m in store.list("redis")] == [newest.id, oldest.id]
