"""Lazy restore (restore_mode = "lazy") with real CRIU: a process holding a known memory pattern
answers correctly after a lazy restore; its lazy-pages daemon is supervised; a corrupt page file
ends the program as crashed."""

from __future__ import annotations

import hashlib
import os
import random
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
from grenadine_sv.supervisor.lazy import PIDFILE
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import python_program, running_supervisor, wait_for, wait_state

pytestmark = [pytest.mark.root, pytest.mark.criu]

MIB = 1 << 20
SEED = 14


def pattern_service(port: int, mebibytes: int) -> str:
    """A service holding `mebibytes` MiB of a seeded pseudo-random pattern; for each connection it
    answers with the SHA-256 of all of it (every page read)."""
    return python_program(
        "import hashlib, random, signal, socket, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"memory = bytearray(random.Random({SEED}).randbytes({mebibytes * MIB}))\n"
        "server = socket.create_server(('127.0.0.1', %d))\n"
        "while True:\n"
        "    conn, _ = server.accept()\n"
        "    try:\n"
        "        conn.sendall(hashlib.sha256(memory).hexdigest().encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "    conn.close()\n" % port
    )


def expected_digest(mebibytes: int) -> str:
    return hashlib.sha256(random.Random(SEED).randbytes(mebibytes * MIB)).hexdigest()


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply.decode()


def program(port: int, mebibytes: int, extra: str = "") -> str:
    return (
        f"[programs.hog]\ncommand = {pattern_service(port, mebibytes)}\n"
        f'restore_mode = "lazy"\nready = {{ tcp = "127.0.0.1:{port}", timeout = "60s" }}\n'
        f"{extra}"
    )


def events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == name]


async def ask_async(port: int) -> str:
    return await trio.to_thread.run_sync(ask, port)


async def test_lazily_restored_process_answers_with_all_its_memory(sv_dirs: SupervisorDirs):
    port, mebibytes = free_port(), 64
    config = sv_dirs.write_config(program(port, mebibytes))
    store = ImageStore(sv_dirs.state_dir)
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "hog", State.RUNNING, timeout=60)
            assert await ask_async(port) == expected_digest(mebibytes)
            [entry] = await sv.operations.checkpoint_programs(["hog"], stop=True)
            assert entry["ok"]
            await wait_state(sv, "hog", State.STOPPED)

            result = await sv.operations.restore_program("hog", "latest")

            assert result["fallback"] is None
            await wait_state(sv, "hog", State.RUNNING, timeout=60)
            assert await ask_async(port) == expected_digest(mebibytes)
            [done] = [e for e in events(logs, "restore_done") if e["program"] == "hog"]
            assert done["restore_mode"] == "lazy"
            await wait_for(lambda: bool(events(logs, "restore_memory_complete")), timeout=60)
            assert not (sv_dirs.state_dir / "restore-logs" / "hog" / PIDFILE).exists()
            # With all memory back, checkpoints work again, and the image served is prunable.
            [again] = await sv.operations.checkpoint_programs(["hog"], stop=False)
            assert again["ok"]
            assert len(store.list("hog")) == 2
    assert not events(logs, "lazy_pages_failed")


def idle_service(port: int, mebibytes: int) -> str:
    """A service holding `mebibytes` MiB of touched memory that answers "ok" without reading it:
    after a lazy restore its memory comes back only through the daemon's background transfer,
    which takes a while at this size."""
    return python_program(
        "import signal, socket, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"memory = bytearray(b'\\x01') * {mebibytes * MIB}\n"
        f"server = socket.create_server(('127.0.0.1', {port}))\n"
        "while True:\n"
        "    conn, _ = server.accept()\n"
        "    conn.sendall(b'ok')\n"
        "    conn.close()\n"
    )


async def restore_and_hold_daemon(sv: Supervisor, work_dir: Path, image_id: str) -> int:
    """Restore lazily and stop the lazy-pages daemon as soon as the program runs again (the
    restore itself needs the daemon), before its background transfer is over; returns the
    daemon's pid."""
    runner = sv.programs.runners["hog"]
    before = runner.process
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sv.operations.restore_program, "hog", image_id)
        with trio.fail_after(60):
            while runner.process is before:
                await trio.sleep(0.001)
        daemon_pid = int((work_dir / PIDFILE).read_text())
        os.kill(daemon_pid, signal.SIGSTOP)
    return daemon_pid


HELD_MIB = 512


async def test_checkpoint_waits_until_all_memory_is_back(sv_dirs: SupervisorDirs):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.hog]\ncommand = {idle_service(port, HELD_MIB)}\n"
        f'restore_mode = "lazy"\nready = {{ tcp = "127.0.0.1:{port}", timeout = "60s" }}\n'
    )
    work_dir = sv_dirs.state_dir / "restore-logs" / "hog"
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "hog", State.RUNNING, timeout=60)
            [entry] = await sv.operations.checkpoint_programs(["hog"], stop=True)
            await wait_state(sv, "hog", State.STOPPED)
            daemon_pid = await restore_and_hold_daemon(sv, work_dir, entry["image"]["id"])
            checkpoint_done = trio.Event()

            async def checkpoint() -> None:
                await sv.operations.checkpoint_programs(["hog"], stop=False)
                checkpoint_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(checkpoint)
                with trio.move_on_after(1.0):
                    await checkpoint_done.wait()
                held = not checkpoint_done.is_set()
                os.kill(daemon_pid, signal.SIGCONT)
            assert held, "a checkpoint ran while the lazy restore was still serving memory"
            assert events(logs, "restore_memory_complete")
            assert len(ImageStore(sv_dirs.state_dir).list("hog")) == 2


async def test_lazy_pages_daemon_that_dies_early_ends_the_program_as_crashed(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.hog]\ncommand = {idle_service(port, HELD_MIB)}\n"
        f'restore_mode = "lazy"\nready = {{ tcp = "127.0.0.1:{port}", timeout = "60s" }}\n'
        'autorestart = "never"\n'
    )
    work_dir = sv_dirs.state_dir / "restore-logs" / "hog"
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "hog", State.RUNNING, timeout=60)
            [entry] = await sv.operations.checkpoint_programs(["hog"], stop=True)
            await wait_state(sv, "hog", State.STOPPED)
            daemon_pid = await restore_and_hold_daemon(sv, work_dir, entry["image"]["id"])
            restored_pid = sv.programs.runners["hog"].machine.pid

            os.kill(daemon_pid, signal.SIGKILL)

            await wait_for(lambda: sv.programs.runners["hog"].state == State.EXITED, timeout=30)
            [failed] = events(logs, "lazy_pages_failed")
            assert "SIGKILL" in str(failed["error"])
            assert restored_pid is not None
            assert not Path(f"/proc/{restored_pid}").exists()
    assert not events(logs, "restore_memory_complete")


async def test_corrupt_page_file_found_while_served_ends_the_program(sv_dirs: SupervisorDirs):
    port, mebibytes = free_port(), 16
    config = sv_dirs.write_config(program(port, mebibytes, 'autorestart = "never"\n'))
    store = ImageStore(sv_dirs.state_dir)
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            await wait_state(sv, "hog", State.RUNNING, timeout=60)
            assert await ask_async(port) == expected_digest(mebibytes)
            await sv.operations.checkpoint_programs(["hog"], stop=True)
            await wait_state(sv, "hog", State.STOPPED)
            [image] = store.list("hog")
            pages = next(store.criu_dir(image).glob("pages-*.img"))
            with pages.open("r+b") as file:  # same size, one byte changed
                file.seek(pages.stat().st_size - 100)
                byte = file.read(1)
                file.seek(-1, os.SEEK_CUR)
                file.write(bytes([byte[0] ^ 0xFF]))

            overtaken = ""
            try:
                await sv.operations.restore_program("hog", image.id)
            except ControlError as exc:  # the corruption was found before the restore answered
                overtaken = str(exc)
            assert not overtaken or f"image {image.id[:12]} is not what runs" in overtaken

            [done] = [e for e in events(logs, "restore_done") if e["image_id"] == image.id]
            restored_pid = int(str(done["pid"]))
            await wait_for(lambda: bool(events(logs, "lazy_restore_corrupt")), timeout=60)
            [corrupt] = events(logs, "lazy_restore_corrupt")
            assert "does not match its blake3 checksum" in str(corrupt["error"])
            # The instance is killed (whether it had counted as started or not).
            await wait_for(lambda: sv.programs.runners["hog"].machine.pid != restored_pid)
            assert not Path(f"/proc/{restored_pid}").exists()
            # The image is not restored again: the next attempt falls back at once.
            result = await sv.operations.restore_program("hog", image.id)
            assert "did not match" in str(result["fallback"])
    assert not events(logs, "restore_memory_complete")


def lazy_pages_daemons_in(work_dir: Path) -> list[int]:
    """Pids of `criu lazy-pages` processes working in `work_dir` (the program's restore logs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"lazy-pages" in cmdline and Path(cwd) == work_dir:
            found.append(int(entry.name))
    return found


async def test_corrupt_file_found_before_a_lazy_restore_leaves_no_daemon(sv_dirs: SupervisorDirs):
    # The lazy-pages daemon starts while the image's other files are verified: when one of
    # them does not match, the restore fails as any restore of a corrupt image does, and the
    # daemon started meanwhile is ended.
    port, mebibytes = free_port(), 16
    config = sv_dirs.write_config(program(port, mebibytes))
    store = ImageStore(sv_dirs.state_dir)
    work_dir = sv_dirs.state_dir / "restore-logs" / "hog"
    async with running_supervisor(config) as sv:
        await wait_state(sv, "hog", State.RUNNING, timeout=60)
        await sv.operations.checkpoint_programs(["hog"], stop=True)
        await wait_state(sv, "hog", State.STOPPED)
        [image] = store.list("hog")
        core = next(store.criu_dir(image).glob("core-*.img"))
        with core.open("r+b") as file:  # same size, one byte changed
            byte = file.read(1)
            file.seek(0)
            file.write(bytes([byte[0] ^ 0xFF]))

        result = await sv.operations.restore_program("hog", image.id)

        assert "does not match its blake3 checksum" in str(result["fallback"])
        assert core.name in str(result["fallback"])
        # The daemon was started (its pidfile says so) and has been ended.
        assert (work_dir / PIDFILE).exists()
        assert lazy_pages_daemons_in(work_dir) == []
        await wait_state(sv, "hog", State.RUNNING, timeout=60)  # restore_fallback = "cold"
        assert await ask_async(port) == expected_digest(mebibytes)
