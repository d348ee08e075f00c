"""Managing images from the command line: a corrupt image is marked, skipped by
restore_fallback = "previous" and removable; prune and rmi keep the image a pinned restore
needs; images of removed programs stay reachable."""

from __future__ import annotations

import json

import pytest

from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.test_cli import (
    IDLE,
    SupervisorProcess,
    memcached_get,
    memcached_program,
    memcached_set,
    needs_criu,
    supervisor,
)
from tests.integration.test_cli_contract import log_events

__all__ = ["needs_criu", "supervisor"]

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.usefixtures("needs_criu")]


def corrupt(store: ImageStore, program: str, ref: str) -> str:
    """Overwrite the pages of an image with zeros (same size); returns the file's name."""
    pages = next(store.criu_dir(store.resolve(program, ref)).glob("pages-*.img"))
    pages.write_bytes(b"\0" * pages.stat().st_size)
    return pages.name


def test_a_corrupt_newest_image_falls_back_to_the_previous_one_visibly(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    program = memcached_program("cache", port, "keep = 10").replace(
        "[programs.cache.checkpoint]",
        'restore = "latest"\nrestore_on = ["start"]\nrestore_fallback = "previous"\n\n'
        "[programs.cache.checkpoint]",
    )
    sv_dirs.write_config(program)
    supervisor.start()
    supervisor.wait_running("cache")
    memcached_set(port, "k", "good")
    supervisor.cli("checkpoint", "cache")
    memcached_set(port, "k", "newer")
    supervisor.cli("checkpoint", "cache")
    store = ImageStore(sv_dirs.state_dir)
    newest, good = store.list("cache")
    pages = corrupt(store, "cache", newest.id)

    supervisor.cli("stop", "cache")
    supervisor.cli("start", "cache")
    assert memcached_get(port, "k") == "good"
    fell_back = [e for e in log_events(supervisor) if e.get("event") == "restore_fallback_previous"]
    assert [(e["program"], e["image_id"]) for e in fell_back] == [("cache", good.id)]
    assert newest.id in str(fell_back[0]["reason"])

    table = supervisor.cli("images", "cache").stdout.splitlines()
    assert [row.split()[-1] for row in table[1:3]] == ["CORRUPT", "ok"]
    assert (
        table[3] == f"{newest.id[:12]} is corrupt: criu/{pages} "
        f"does not match its {newest.checksum_algorithm} checksum"
    )
    listed = json.loads(supervisor.cli("images", "cache", "--json").stdout)
    assert [bool(i["corrupt"]) for i in listed] == [True, False]

    # The corrupt one is pinned by restore = "latest": removing it needs --force.
    refused = supervisor.cli("rmi", "cache", "0", code=1)
    assert "programs.cache.restore" in refused.stderr
    assert "--force" in refused.stderr
    removed = supervisor.cli("rmi", "cache", "0", "--force").stdout
    assert removed == f"cache: removed image {newest.id[:12]}\n"
    assert [i.id for i in store.list("cache")] == [good.id]
    supervisor.cli("rmi", "cache", newest.id, code=2)  # gone: an unknown image


def test_prune_keeps_the_pinned_image_unless_forced(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    sv_dirs.write_config(memcached_program("cache", port))
    supervisor.start()
    supervisor.wait_running("cache")
    supervisor.cli("checkpoint", "cache")
    supervisor.cli("checkpoint", "cache")
    store = ImageStore(sv_dirs.state_dir)
    newest, oldest = store.list("cache")
    sv_dirs.write_config(
        memcached_program("cache", port).replace(
            "[programs.cache.checkpoint]", f'restore = "{oldest.id}"\n[programs.cache.checkpoint]'
        )
    )
    assert supervisor.cli("reload").stdout == "updated: cache\n"
    refused = supervisor.cli("prune", "cache", "--keep", "0", code=1)
    assert f"image {oldest.id[:12]}, which programs.cache.restore" in refused.stderr
    assert len(store.list("cache")) == 2  # nothing deleted
    forced = supervisor.cli("prune", "cache", "--keep", "0", "--force").stdout
    assert forced == f"cache: deleted 2 images ({newest.id[:12]}, {oldest.id[:12]})\n"


def test_images_of_a_removed_program_are_listed_with_all_and_pruned_by_name(
    supervisor: SupervisorProcess, sv_dirs: SupervisorDirs
) -> None:
    port = free_port()
    idle = f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0\n"
    sv_dirs.write_config(memcached_program("web", port) + idle)
    supervisor.start()
    supervisor.wait_running("web", "idle")
    supervisor.cli("checkpoint", "web")
    sv_dirs.write_config(idle)
    assert supervisor.cli("reload").stdout == "removed: web\n"

    default = supervisor.cli("images")
    assert default.stdout == "no images\n"
    assert "no longer configured, web: see images --all" in default.stderr
    every = supervisor.cli("images", "--all").stdout.splitlines()
    assert [row.split()[7] for row in every[1:]] == ["web"]
    assert len(supervisor.cli("images", "web").stdout.splitlines()) == 2

    pruned = supervisor.cli("prune", "web").stdout
    assert pruned.startswith("web: deleted 1 image (")
    assert ImageStore(sv_dirs.state_dir).list("web") == []
    supervisor.cli("prune", "nosuch", code=2)
