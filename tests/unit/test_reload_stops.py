"""A reload stops a replaced program until it stays stopped, with fake processes on trio's
MockClock: an instance started while it stopped is not left running unwatched."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import trio
import trio.testing

from grenadine_sv.config.loading import load_config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.testing import FakeLauncher, FakeProcess


def write_config(tmp_path: Path, mark: str) -> Path:
    path = tmp_path / "grenadine.toml"
    path.write_text(
        f'[supervisor]\nstate_dir = "{tmp_path / "state"}"\nlog_dir = "{tmp_path / "logs"}"\n'
        f'[programs.p]\ncommand = ["/bin/true"]\nstartsecs = 1\nstopwaitsecs = 5\n'
        f'environment = {{ MARK = "{mark}" }}\n'
    )
    return path


def stubborn(pid: int) -> FakeProcess:
    """Its stop takes the whole stopwaitsecs."""
    return FakeProcess(pid, ignore=frozenset({signal.SIGTERM}))


async def test_a_program_started_again_while_a_reload_stops_it_is_stopped_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    launcher = FakeLauncher(stubborn)
    programs = Programs(load_config(write_config(tmp_path, "one")), launcher=launcher)
    deploys = Deploys(programs, None)
    async with trio.open_nursery() as nursery:
        programs.attach(nursery)
        old = await programs.add(programs.config.programs["p"])
        assert await old.start(timeout=10) == State.RUNNING

        async def start_once_stopped() -> None:
            # As a request that was waiting for that stop would (a restore did).
            await old.wait_until(lambda s: s == State.STOPPED, math.inf)
            old.request_start()

        nursery.start_soon(start_once_stopped)
        write_config(tmp_path, "two")
        assert (await deploys.reload())["changed"] == ["p"]
        new = programs.runners["p"]
        assert new.config.environment == {"MARK": "two"}
        assert new.state == State.RUNNING
        assert old.state == State.STOPPED
        running = [process.pid for process in launcher.made if process.returncode is None]
        assert running == [new.machine.pid]
        nursery.cancel_scope.cancel()
