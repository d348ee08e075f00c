"""Requests that meet on one program: each reply is true of what runs once all are done.

The program ignores SIGTERM, so the stop phase of a restore lasts its whole stopwaitsecs:
a second request sent once the program is STOPPING arrives inside it every time."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.core import Supervisor
from grenadine_sv.supervisor.runner import ProgramRunner
from tests.conftest import SupervisorDirs
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state
from tests.integration.supervisor_processes import GRENADINE_SV
from tests.leftovers import alive, end_pids

pytestmark = [pytest.mark.root, pytest.mark.criu]

STUBBORN = python_program(
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True: print('alive', flush=True); time.sleep(0.2)\n"
)
# Bounds every request of a test: a restore left waiting on a runner that is gone waited
# for its whole start bound (minutes).
REQUESTS_SECONDS = 60.0


def stubborn_config(sv_dirs: SupervisorDirs, mark: str = "one") -> None:
    sv_dirs.write_config(
        f"[programs.stubborn]\ncommand = {STUBBORN}\nstartsecs = 0.2\nstopwaitsecs = 2\n"
        f'environment = {{ MARK = "{mark}" }}\n'
    )


def running_image(runner: ProgramRunner) -> str | None:
    """The image the program's current instance was restored from (None: not restored)."""
    origin = runner.restored_from
    return origin.image_id if origin is not None and runner.state == State.RUNNING else None


async def checkpoint(sv: Supervisor) -> str:
    (made,) = await sv.operations.checkpoint_programs(["stubborn"], stop=False)
    return str(made["image"]["id"])


@contextmanager
def ended_on_leaving() -> Iterator[set[int]]:
    """Pids the caller adds are ended on leaving: an instance a runner dropped without ending
    it is no longer the supervisor's to end."""
    seen: set[int] = set()
    try:
        yield seen
    finally:
        end_pids([pid for pid in seen if alive(pid)])


async def restore(sv: Supervisor, image: str) -> tuple[dict[str, Any] | ControlError, str | None]:
    """Restore `image` (no pre-restore checkpoint): the reply, or the refusal, and the image
    that runs at the moment it is made."""
    runner = sv.programs.runners["stubborn"]
    try:
        reply: dict[str, Any] | ControlError = await sv.operations.restore_program(
            "stubborn", image, True
        )
    except ControlError as exc:
        reply = exc
    return reply, running_image(runner)


async def in_stop_phase_of_a_restore(
    sv: Supervisor, image: str, other: Callable[[], Awaitable[Any]]
) -> tuple[dict[str, Any] | ControlError, str | None]:
    """Restore `image` and, once the running instance is STOPPING for it, run `other`;
    returns what `restore` does."""
    runner = sv.programs.runners["stubborn"]
    outcome: list[tuple[dict[str, Any] | ControlError, str | None]] = []

    async def restoring() -> None:
        outcome.append(await restore(sv, image))

    with trio.fail_after(REQUESTS_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restoring)
            await wait_for(lambda: runner.state == State.STOPPING, 10, "stop phase")
            await other()
    return outcome[0]


async def test_two_restores_of_one_program_run_one_after_the_other_each_reply_true(
    sv_dirs: SupervisorDirs,
) -> None:
    stubborn_config(sv_dirs)
    async with running_supervisor(sv_dirs.config) as sv:
        await wait_state(sv, "stubborn", State.RUNNING)
        first, second = await checkpoint(sv), await checkpoint(sv)
        later: list[tuple[dict[str, Any] | ControlError, str | None]] = []

        async def second_restore() -> None:
            later.append(await restore(sv, second))

        reply, running = await in_stop_phase_of_a_restore(sv, first, second_restore)
        ((second_reply, second_running),) = later
        assert isinstance(reply, dict), reply
        assert isinstance(second_reply, dict), second_reply
        # Each reply is true when it is made, and the restore asked last is what runs.
        assert (reply["image"], reply["state"], running) == (first, "RUNNING", first)
        assert (second_reply["image"], second_reply["state"]) == (second, "RUNNING")
        assert second_running == second
        assert running_image(sv.programs.runners["stubborn"]) == second


async def test_a_stop_asked_during_the_stop_phase_of_a_restore_wins(
    sv_dirs: SupervisorDirs,
) -> None:
    stubborn_config(sv_dirs)
    async with running_supervisor(sv_dirs.config) as sv:
        await wait_state(sv, "stubborn", State.RUNNING)
        image = await checkpoint(sv)
        runner = sv.programs.runners["stubborn"]
        stopped: list[State] = []

        async def stop() -> None:
            await sv.operations.stop_programs(["stubborn"])
            stopped.append(runner.state)

        reply, _ = await in_stop_phase_of_a_restore(sv, image, stop)
        assert stopped == [State.STOPPED]
        assert runner.state == State.STOPPED
        assert isinstance(reply, ControlError), reply
        assert not reply.usage
        assert f"image {image[:12]} is not what runs" in str(reply)
        assert "STOPPED" in str(reply)


async def test_a_restore_overtaken_by_a_reload_does_not_claim_it_restored(
    sv_dirs: SupervisorDirs,
) -> None:
    stubborn_config(sv_dirs, mark="one")
    async with running_supervisor(sv_dirs.config) as sv:
        await wait_state(sv, "stubborn", State.RUNNING)
        image = await checkpoint(sv)
        old = sv.programs.runners["stubborn"]
        with ended_on_leaving() as seen:

            async def reload() -> None:
                stubborn_config(sv_dirs, mark="two")
                assert (await sv.operations.reload())["changed"] == ["stubborn"]

            try:
                reply, _ = await in_stop_phase_of_a_restore(sv, image, reload)
            finally:
                if old.process is not None:  # the old runner's last instance
                    seen.add(old.process.pid)
            assert isinstance(reply, ControlError), reply
            assert f"image {image[:12]} is not what runs" in str(reply)
            new = sv.programs.runners["stubborn"]
            assert new is not old
            assert new.config.environment == {"MARK": "two"}
            await wait_state(sv, "stubborn", State.RUNNING)
            assert new.restored_from is None
            assert old.process is None or not alive(old.process.pid), "the old definition runs"


async def test_the_command_line_restore_overtaken_by_a_stop_exits_1_saying_what_runs(
    sv_dirs: SupervisorDirs,
) -> None:
    stubborn_config(sv_dirs)
    async with running_supervisor(sv_dirs.config) as sv:
        await wait_state(sv, "stubborn", State.RUNNING)
        image = await checkpoint(sv)
        runner = sv.programs.runners["stubborn"]
        command = [
            *GRENADINE_SV,
            "-c",
            str(sv_dirs.config),
            "restore",
            "stubborn",
            image,
            "--force",
        ]
        done: list[subprocess.CompletedProcess[bytes]] = []

        async def restore_command() -> None:
            run = trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
            done.append(await run)

        with trio.fail_after(REQUESTS_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restore_command)
                await wait_for(lambda: runner.state == State.STOPPING, 10, "stop phase")
                await sv.operations.stop_programs(["stubborn"])
        (result,) = done
        assert result.returncode == 1
        assert result.stderr.decode() == (
            f"grenadine-sv: restore failed: image {image[:12]} is not what runs: a stop or a"
            " reload of it was asked during the restore; stubborn is STOPPED\n"
        )
        assert runner.state == State.STOPPED
