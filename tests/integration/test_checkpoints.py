"""Checkpoint and restore with real CRIU and real daemons, driven through the supervisor."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from grenadine_sv.control.protocol import ControlError
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from grenadine_sv.supervisor.core import Supervisor
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    TICKER,
    counter_command,
    hit,
    pid_alive,
    python_program,
    running_supervisor,
    wait_for,
    wait_state,
)

pytestmark = [pytest.mark.root, pytest.mark.criu]

MEMCACHED = "/usr/bin/memcached"


# CRIU cannot dump an io_uring instance (syscall 425 on x86-64).
UNDUMPABLE = python_program(
    "import ctypes, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.syscall(425, 4, ctypes.create_string_buffer(120)) >= 0\n"
    "while True: print('alive'); time.sleep(0.1)\n"
)


def memcached_command(port: int) -> str:
    return f'["{MEMCACHED}", "-u", "root", "-l", "127.0.0.1", "-p", "{port}"]'


def memcached(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while not reply.endswith((b"END\r\n", b"STORED\r\n")):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


async def test_seed_scenario_memcached_key_survives_signal_checkpoint_and_restore(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    program = (
        f"[programs.memcached]\ncommand = {memcached_command(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    policy = "[programs.memcached.checkpoint]\non_signal = true\n"
    config = sv_dirs.write_config(program + policy)
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        first_pid = await wait_state(sv, "memcached", State.RUNNING)
        assert memcached(port, b"set foo 0 0 10\r\ngrenadine!\r\n") == b"STORED\r\n"
        os.kill(os.getpid(), signal.SIGUSR1)
        await wait_for(lambda: len(store.list("memcached")) == 1, what="an image after USR1")
        [image] = store.list("memcached")
        assert image.comm == "memcached"
        assert image.trigger == "signal"
        assert image.dump_stats["frozen_time"] > 0
        assert image.memory_bytes == image.dump_stats["pages_written"] * os.sysconf("SC_PAGESIZE")
        on_disk = sum(f.stat().st_size for f in store.criu_dir(image).rglob("*") if f.is_file())
        assert image.image_bytes >= on_disk > image.memory_bytes > 0
        assert sv.programs.runners["memcached"].state == State.RUNNING

        await sv.operations.stop_programs(["memcached"])
        result = await sv.operations.restore_program("memcached", "latest")
        assert result["fallback"] is None
        new_pid = await wait_state(sv, "memcached", State.RUNNING)
        assert new_pid != first_pid
        assert b"grenadine!" in memcached(port, b"get foo\r\n")
        nspid = Path(f"/proc/{new_pid}/status").read_text().split("NSpid:")[1].split("\n")[0]
        assert nspid.split()[-1] == "1"

    # The supervisor stopped (and memcached with it); started again with the image pinned,
    # memcached comes back with its data.
    config = sv_dirs.write_config(program + 'restore = "latest"\n' + policy)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "memcached", State.RUNNING)
        assert b"grenadine!" in memcached(port, b"get foo\r\n")


async def test_output_keeps_flowing_into_the_log_after_a_restore(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    log = sv_dirs.stdout_log("ticker")

    def last_tick() -> int:
        ticks = re.findall(rb"tick (\d+)", log.read_bytes())
        return int(ticks[-1]) if ticks else -1

    async with running_supervisor(config) as sv:
        await wait_state(sv, "ticker", State.RUNNING)
        await wait_for(lambda: last_tick() >= 2)
        [entry] = await sv.operations.checkpoint_programs(["ticker"], stop=True)
        assert entry["ok"]
        await wait_state(sv, "ticker", State.STOPPED)
        stopped_at = last_tick()
        await sv.operations.restore_program("ticker", entry["image"]["id"])
        await wait_state(sv, "ticker", State.RUNNING)
        # The restored process goes on counting from where it was dumped.
        await wait_for(lambda: last_tick() >= stopped_at + 3, what="ticks after the restore")


async def test_interval_policy_checkpoints_and_applies_retention(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(
        f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n"
        '[programs.ticker.checkpoint]\ninterval = "0.5s"\nkeep = 2\n'
    )
    store = ImageStore(sv_dirs.state_dir)
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "ticker", State.RUNNING)

            def done() -> int:
                return sum(1 for e in logs if e["event"] == "checkpoint_done")

            await wait_for(lambda: done() >= 3, timeout=20, what="three interval checkpoints")
            assert all(image.trigger == "interval" for image in store.list("ticker"))
            # Retention follows each commit (a stop in between leaves one more until the next).
            await wait_for(lambda: len(store.list("ticker")) == 2, what="keep = 2 applied")


async def test_deploy_that_never_gets_ready_is_rolled_back_with_its_state(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    good = (
        f"[programs.counter]\ncommand = {counter_command(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}", timeout = "10s" }}\n'
        "[programs.counter.checkpoint]\npre_deploy = true\nrollback = true\n"
    )
    broken = (
        f'[programs.counter]\ncommand = ["/bin/sleep", "1000"]\nstartretries = 0\n'
        f'stopwaitsecs = 0.5\nready = {{ tcp = "127.0.0.1:{port}", timeout = "1s" }}\n'
        "[programs.counter.checkpoint]\npre_deploy = true\nrollback = true\n"
    )
    config = sv_dirs.write_config(good)
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert [hit(port) for _ in range(3)] == [1, 2, 3]
        sv_dirs.write_config(broken)
        summary = await sv.operations.reload()
        assert summary["changed"] == ["counter"]
        assert summary["rolled_back"] == ["counter"]
        [image] = store.list("counter")
        assert image.trigger == "pre-deploy"
        assert summary["pre_deploy_images"] == {"counter": image.id}
        await wait_state(sv, "counter", State.RUNNING)
        assert hit(port) == 4
        assert "rolled back" in sv.operations.status(["counter"])[0]["reason"]


# Bounds of a checkpoint --stop with a stop asked meanwhile, both done.
CHECKPOINT_AND_STOP_SECONDS = 60.0


async def test_failed_checkpoint_leaves_program_running_and_no_image(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.odd]\ncommand = {UNDUMPABLE}\nstartsecs = 0.2\n")
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "odd", State.RUNNING)
        for stop in (False, True):
            with pytest.raises(ControlError, match="criu dump failed"):
                await sv.operations.checkpoint_programs(["odd"], stop=stop)
            assert sv.programs.runners["odd"].state == State.RUNNING
            assert sv.programs.runners["odd"].machine.pid == pid
        assert store.list("odd") == []
        assert not any(p.name.startswith(".") for p in (store.root / "odd").iterdir())
        size = sv_dirs.stdout_log("odd").stat().st_size
        await wait_for(lambda: sv_dirs.stdout_log("odd").stat().st_size > size)


async def test_a_checkpoint_of_several_programs_lists_the_images_made_beside_the_failures(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(
        f"[programs.odd]\ncommand = {UNDUMPABLE}\nstartsecs = 0.2\n"
        f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n"
    )
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "odd", State.RUNNING)
        await wait_state(sv, "ticker", State.RUNNING)
        odd, ticker = await sv.operations.checkpoint_programs(["odd", "ticker"], stop=False)
        assert (odd["program"], odd["ok"]) == ("odd", False)
        assert "criu dump failed" in odd["error"]
        assert (ticker["program"], ticker["ok"]) == ("ticker", True)
        assert [m.id for m in store.list("ticker")] == [ticker["image"]["id"]]
        assert store.list("odd") == []


async def checkpoint_stop_and_a_stop_meanwhile(
    sv: Supervisor, name: str
) -> tuple[object, list[State]]:
    """`checkpoint --stop NAME` and, while CRIU dumps it (the program STOPPING for the
    checkpoint), `stop NAME`. Returns the checkpoint's answer (or its ControlError) and the
    states the program went through meanwhile: a RUNNING among them would be a stop asked
    once the checkpoint had ended."""
    runner = sv.programs.runners[name]
    history = runner.machine.history
    before = len(history)
    outcome: list[object] = []

    async def checkpoint_stop() -> None:
        try:
            outcome.append(await sv.operations.checkpoint_programs([name], stop=True))
        except ControlError as exc:
            outcome.append(exc)

    with trio.fail_after(CHECKPOINT_AND_STOP_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoint_stop)
            await runner.wait_until(lambda s: s == State.STOPPING, CHECKPOINT_AND_STOP_SECONDS)
            assert runner.state == State.STOPPING
            assert not outcome
            await sv.operations.stop_programs([name])
    return outcome[0], [state for _, state in history[before:]]


async def test_a_stop_asked_during_a_failing_checkpoint_stop_is_carried_out(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(f"[programs.odd]\ncommand = {UNDUMPABLE}\nstartsecs = 0.2\n")
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "odd", State.RUNNING)
        failed, states = await checkpoint_stop_and_a_stop_meanwhile(sv, "odd")
        assert isinstance(failed, ControlError)
        assert "criu dump failed" in str(failed)
        assert states == [State.STOPPING, State.STOPPED]
        assert not pid_alive(pid)
        assert sv.programs.runners["odd"].machine.last_exit == 0  # its own SIGTERM handler
        assert store.list("odd") == []


async def test_a_stop_asked_during_a_checkpoint_stop_that_succeeds_keeps_the_image(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "ticker", State.RUNNING)
        answer, states = await checkpoint_stop_and_a_stop_meanwhile(sv, "ticker")
        assert isinstance(answer, list), answer
        [image] = store.list("ticker")
        assert answer[0]["image"]["id"] == image.id
        assert states == [State.STOPPING, State.STOPPED]
        assert not pid_alive(pid)
        assert sv.programs.runners["ticker"].machine.last_exit == -signal.SIGKILL


async def test_corrupt_image_is_refused_before_criu_runs(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    store = ImageStore(sv_dirs.state_dir)
    async with running_supervisor(config) as sv:
        first = await wait_state(sv, "ticker", State.RUNNING)
        [entry] = await sv.operations.checkpoint_programs(["ticker"], stop=True)
        image = store.resolve("ticker", entry["image"]["id"])
        pages = next(store.criu_dir(image).glob("pages-*.img"))
        data = bytearray(pages.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pages.write_bytes(bytes(data))
        result = await sv.operations.restore_program("ticker", image.id)
        assert "pages-" in result["fallback"]
        assert result["state"] == "RUNNING"
        assert result["pid"] != first
        assert not list((sv_dirs.state_dir / "restore-logs").rglob("*.log"))


async def test_pinned_image_that_does_not_exist_follows_restore_fallback(sv_dirs: SupervisorDirs):
    missing = "0123456789abcdef0123456789abcdef"
    config = sv_dirs.write_config(
        f"[programs.cold]\ncommand = {TICKER}\nstartsecs = 0.2\nrestore = '{missing}'\n"
        f"[programs.strict]\ncommand = {TICKER}\nstartsecs = 0.2\nrestore = '{missing}'\n"
        "restore_fallback = 'fail'\n"
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "cold", State.RUNNING)
        await wait_state(sv, "strict", State.FATAL)
        assert missing[:8] in sv.programs.runners["strict"].machine.reason
        await trio.lowlevel.checkpoint()


async def test_pinned_latest_image_starts_the_program_from_it(sv_dirs: SupervisorDirs):
    port = free_port()
    program = (
        f"[programs.counter]\ncommand = {counter_command(port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{port}" }}\n'
    )
    config = sv_dirs.write_config(program)
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert [hit(port) for _ in range(2)] == [1, 2]
        [entry] = await sv.operations.checkpoint_programs(["counter"], stop=False)
    config = sv_dirs.write_config(program + 'restore = "latest"\n')
    async with running_supervisor(config) as sv:
        await wait_state(sv, "counter", State.RUNNING)
        assert hit(port) == 3
        # A new supervisor knows the last checkpoint from the image store.
        last = sv.operations.status(["counter"])[0]["last_checkpoint"]
        assert last["id"] == entry["image"]["id"]
