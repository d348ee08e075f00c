"""Sealing while CRIU writes: the watcher's digests are those of the files as they end up, and a
file changed after CRIU closed it is hashed again."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

from grenadine_sv.store.durable import FILE_MODE
from grenadine_sv.store.sealing import CHUNK_BYTES, DumpWatcher, seal_tree
from tests.integration.supervising import wait_until


def _write_growing(path: Path, pieces: list[bytes], written: threading.Event) -> None:
    """Write `pieces` one by one as CRIU writes a page file, then close it."""
    with path.open("wb") as file:
        for piece in pieces:
            file.write(piece)
            file.flush()
    written.set()


def _digest(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def test_files_written_while_watched_get_their_final_digests(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    top = tmp_path / "criu"
    top.mkdir()
    pieces = [os.urandom(CHUNK_BYTES // 2) for _ in range(7)]  # several chunks, a ragged end
    with DumpWatcher(top, pool) as watcher:
        (top / "pstree.img").write_bytes(b"tree")
        done = threading.Event()
        writer = threading.Thread(target=_write_growing, args=(top / "pages-1.img", pieces, done))
        writer.start()
        writer.join()
        wait_until(
            lambda: {name for name, _ in watcher.records()} == {"pstree.img", "pages-1.img"},
            timeout=10,
        )
    records = seal_tree(top, watcher)

    assert records["pages-1.img"].size == len(b"".join(pieces))
    assert records["pages-1.img"].digest == _digest(top / "pages-1.img")
    assert records["pstree.img"].digest == _digest(top / "pstree.img")
    assert (top / "pages-1.img").stat().st_mode & 0o777 == FILE_MODE


def test_a_file_rewritten_after_it_was_closed_is_hashed_again(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    top = tmp_path / "criu"
    top.mkdir()
    with DumpWatcher(top, pool) as watcher:
        (top / "inventory.img").write_bytes(b"first")
        wait_until(lambda: any(True for _ in watcher.records()), timeout=10)
    # Same size, other bytes, after the watcher vouched for the first version.
    with (top / "inventory.img").open("r+b") as file:
        file.write(b"other")
    records = seal_tree(top, watcher)

    assert records["inventory.img"].digest == blake3.blake3(b"other").hexdigest()


def test_files_the_watcher_never_saw_are_sealed_too(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    top = tmp_path / "criu"
    (top / "sub").mkdir(parents=True)
    with DumpWatcher(top, pool) as watcher:
        (top / "sub" / "x.img").write_bytes(b"x")  # a subdirectory is not watched
    records = seal_tree(top, watcher)

    assert records["sub/x.img"].digest == blake3.blake3(b"x").hexdigest()
