"""depends_on across a reload, with fake processes: a dependent waiting for its dependency
follows the runner a reload puts in its place. Real time (a reload reads its file in a
thread), in tenths of a second: the first db never gets ready within a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from grenadine_sv.config.loading import load_config
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.supervisor.deploys import Deploys
from grenadine_sv.supervisor.programs import Programs
from grenadine_sv.testing import FakeLauncher

TIMEOUT = 10.0
NEVER_READY = 3600


def db(version: str, startsecs: float) -> str:
    return (
        f'[programs.db]\ncommand = ["/bin/db"]\nstartsecs = {startsecs}\n'
        f'environment = {{ V = "{version}" }}\n'
    )


def web(version: str = "1") -> str:
    return (
        '[programs.web]\ncommand = ["/bin/web"]\nstartsecs = 0.1\ndepends_on = ["db"]\n'
        f'environment = {{ V = "{version}" }}\n'
    )


def write_config(directory: Path, programs: str) -> Path:
    path = directory / "grenadine.toml"
    path.write_text(
        f'[supervisor]\nstate_dir = "{directory / "state"}"\nlog_dir = "{directory / "logs"}"\n'
        f'control_socket = "{directory / "ctl.sock"}"\n\n{programs}'
    )
    return path


@asynccontextmanager
async def autostarted(path: Path) -> AsyncIterator[tuple[Programs, Deploys]]:
    """The programs of this configuration added and autostarted, and their deploys."""
    config = load_config(path)
    programs = Programs(config, launcher=FakeLauncher())
    (path.parent / "logs").mkdir()
    async with trio.open_nursery() as nursery:
        programs.attach(nursery)
        for name in config.start_order():
            await programs.add(config.programs[name])
        programs.autostart(config.start_order(), {})
        yield programs, Deploys(programs, checkpoints=None)
        nursery.cancel_scope.cancel()


async def wait_running(programs: Programs, name: str) -> None:
    with trio.move_on_after(TIMEOUT):
        while programs.runners[name].state != State.RUNNING:
            await programs.runners[name].wait_until(lambda s: s == State.RUNNING, TIMEOUT)
    assert programs.runners[name].state == State.RUNNING, f"{name} not RUNNING in {TIMEOUT} s"


async def reload_while_web_waits(programs: Programs, deploys: Deploys, new_config: str) -> None:
    """With web waiting for db (STARTING), reload a configuration that changes db."""
    await trio.testing.wait_all_tasks_blocked()
    assert programs.runners["db"].state == State.STARTING
    assert programs.runners["web"].state == State.STOPPED
    old_db = programs.runners["db"]
    write_config(programs.config.path.parent, new_config)
    with trio.fail_after(TIMEOUT):
        summary = await deploys.reload()
    assert "db" in summary["changed"]
    assert programs.runners["db"] is not old_db
    assert programs.runners["db"].state == State.RUNNING


async def test_a_dependent_waiting_for_a_replaced_dependency_starts_after_the_new_one(
    tmp_path: Path,
):
    path = write_config(tmp_path, db("1", NEVER_READY) + web())
    async with autostarted(path) as (programs, deploys):
        old_web = programs.runners["web"]
        await reload_while_web_waits(programs, deploys, db("2", 0.1) + web())
        await wait_running(programs, "web")
        assert programs.runners["web"] is old_web


async def test_a_dependent_replaced_too_while_it_waits_starts_once_as_its_new_runner(
    tmp_path: Path,
):
    path = write_config(tmp_path, db("1", NEVER_READY) + web())
    async with autostarted(path) as (programs, deploys):
        old_web = programs.runners["web"]
        await reload_while_web_waits(programs, deploys, db("2", 0.1) + web("2"))
        await wait_running(programs, "web")
        assert programs.runners["web"] is not old_web
        await trio.testing.wait_all_tasks_blocked()
        assert old_web.machine.instance == 0  # the replaced runner never started


async def test_a_dependent_waits_for_a_replaced_dependency_added_after_another_program(
    tmp_path: Path,
):
    """A reload adds its programs one at a time: `cache` first (by name), before db's new
    runner exists. web does not take db's absence meanwhile for no dependency."""
    path = write_config(tmp_path, db("1", NEVER_READY) + web())
    cache = '[programs.cache]\ncommand = ["/bin/cache"]\nstartsecs = 0.1\n'
    async with autostarted(path) as (programs, deploys):
        await reload_while_web_waits(programs, deploys, cache + db("2", 0.1) + web())
        await wait_running(programs, "web")
        [db_ready] = [t for t, s in programs.runners["db"].machine.history if s == State.RUNNING]
        [web_started] = [
            t for t, s in programs.runners["web"].machine.history if s == State.STARTING
        ]
        assert web_started >= db_ready
