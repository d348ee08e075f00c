"""An image is restored only into the definition it was taken under, unless asked explicitly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from grenadine_sv.control.server import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    COUNTER_SERVICE,
    hit,
    running_supervisor,
    wait_state,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]


def counter_program(port: int, extra: str, restore: str = "") -> str:
    # The system's python: user nobody cannot run the test's virtualenv one.
    command = json.dumps(
        ["/usr/bin/python3", "-u", os.fspath(COUNTER_SERVICE), "--port", str(port)]
    )
    return (
        f"[programs.counter]\ncommand = {command}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n{restore}{extra}\n'
    )


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


async def test_restore_into_a_changed_user_and_secret_is_refused_naming_them(
    sv_dirs: SupervisorDirs,
) -> None:
    port = free_port()
    config = sv_dirs.write_config(counter_program(port, 'environment = { SECRET = "hunter2" }'))
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert await trio.to_thread.run_sync(hit, port) == 1
        (made,) = await sv.operations.checkpoint_programs(["counter"], stop=False)
        image_id = made["image"]["id"]
        assert "hunter2" not in json.dumps(made["image"])

        sv_dirs.write_config(
            counter_program(port, 'user = "nobody"\nenvironment = { SECRET = "rotated" }')
        )
        await sv.operations.reload()
        pid = await wait_state(sv, "counter", State.RUNNING)
        assert uid_of(pid) == 65534

        with pytest.raises(ControlError) as refused:
            await sv.operations.restore_program("counter", image_id)
        message = str(refused.value)
        assert 'user: null -> "nobody"' in message
        assert "environment SECRET changed" in message
        assert "--allow-changed-definition" in message
        assert "hunter2" not in message
        assert "rotated" not in message
        # Refused before anything was touched: the running instance is the same.
        assert sv.programs.runners["counter"].state == State.RUNNING
        assert sv.programs.runners["counter"].machine.pid == pid

        # force: the running instance (user nobody) cannot be checkpointed first on hosts
        # without CAP_SYS_RESOURCE, and this test is about the definition, not that.
        restored = await sv.operations.restore_program(
            "counter", image_id, force=True, allow_changed_definition=True
        )
        assert restored["fallback"] is None
        assert "environment SECRET changed" in restored["warning"]
        new_pid = await wait_state(sv, "counter", State.RUNNING)
        # Asked for explicitly: the old process as it was, with its old user and secret.
        assert uid_of(new_pid) == 0
        assert environ_of(new_pid)["SECRET"] == "hunter2"
        assert await trio.to_thread.run_sync(hit, port) == 2


async def test_pinned_latest_taken_under_another_definition_follows_restore_fallback(
    sv_dirs: SupervisorDirs,
) -> None:
    port = free_port()
    # "start": a reload's start of the replaced program restores too (restore_on).
    pinned = 'restore = "latest"\nrestore_on = ["supervisor-start", "start"]\n'
    config = sv_dirs.write_config(counter_program(port, "umask = 0o022", pinned))
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert await trio.to_thread.run_sync(hit, port) == 1
        await sv.operations.checkpoint_programs(["counter"], stop=False)
        older_same_definition = store.list("counter")[0]
        sv_dirs.write_config(counter_program(port, "umask = 0o077", pinned))
        await sv.operations.reload()
        await wait_state(sv, "counter", State.RUNNING)
        assert await trio.to_thread.run_sync(hit, port) == 1
        await sv.operations.checkpoint_programs(["counter"], stop=False)
        sv_dirs.write_config(counter_program(port, "umask = 0o022", pinned))
        with capture_logs() as logs:
            await sv.operations.reload()
            await wait_state(sv, "counter", State.RUNNING)
        # "latest" is the newest image, taken under umask 0o077: refused with the reason and
        # started cold, never the older image of the same definition in silence.
        fallback = [e for e in logs if e["event"] == "restore_fallback_cold"]
        assert len(fallback) == 1
        assert "umask: 63 -> 18" in fallback[0]["reason"]
        assert older_same_definition.id not in json.dumps([e for e in logs if "image_id" in e])
        assert await trio.to_thread.run_sync(hit, port) == 1


async def test_an_image_from_before_definitions_were_recorded_is_restored_with_a_warning(
    sv_dirs: SupervisorDirs,
) -> None:
    port = free_port()
    config = sv_dirs.write_config(counter_program(port, ""))
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert await trio.to_thread.run_sync(hit, port) == 1
        (made,) = await sv.operations.checkpoint_programs(["counter"], stop=False)
        image_id = made["image"]["id"]
        meta_path = store.root / "counter" / image_id / "meta.json"
        old_format = json.loads(meta_path.read_text())
        for key in ("format_version", "definition", "source_pid", "source_start_time"):
            del old_format[key]
        meta_path.write_text(json.dumps(old_format))

        restored = await sv.operations.restore_program("counter", image_id)

        assert restored["fallback"] is None
        assert "older grenadine-sv" in restored["warning"]
        await wait_state(sv, "counter", State.RUNNING)
        assert await trio.to_thread.run_sync(hit, port) == 2
