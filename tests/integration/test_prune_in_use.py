"""An image cannot be pruned while a restore of it waits for the old instance to stop."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]

# Ignores SIGTERM: stopping it takes its whole stopwaitsecs, then SIGKILL.
STUBBORN = python_program(
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True: print('alive', flush=True); time.sleep(0.2)\n"
)


async def test_prune_during_a_restore_that_waits_for_the_old_instance_keeps_the_image(
    sv_dirs: SupervisorDirs,
) -> None:
    config = sv_dirs.write_config(
        f"[programs.stubborn]\ncommand = {STUBBORN}\nstartsecs = 0.2\nstopwaitsecs = 3\n"
    )
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "stubborn", State.RUNNING)
        (made,) = await sv.operations.checkpoint_programs(["stubborn"], stop=False)
        image_id = made["image"]["id"]
        restored: dict[str, Any] = {}

        async def restore() -> None:
            # force: no pre-restore checkpoint, so the image restored is the only one.
            restored.update(await sv.operations.restore_program("stubborn", image_id, True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restore)
            runner = sv.programs.runners["stubborn"]
            await wait_for(lambda: runner.state == State.STOPPING, 10, "old instance stopping")
            pruned = await sv.operations.prune(["stubborn"], 0)
            assert pruned == {"stubborn": []}
            assert [image.id for image in store.list("stubborn")] == [image_id]
        assert restored["fallback"] is None
        assert restored["state"] == "RUNNING"
