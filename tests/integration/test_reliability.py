"""Faults survived, with real processes and real CRIU: CRIU killed mid-dump, a full disk, a busy
restore target, signal and client storms, malformed control messages, clients holding long
unfinished requests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import termios
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from grenadine_sv.control import client as control
from grenadine_sv.control.protocol import MAX_LINE_BYTES, ControlError, socket_is_live
from grenadine_sv.control.server import LONG_LINE_SLOTS
from grenadine_sv.criu.binary import find_criu
from grenadine_sv.criu.client import (
    CriuError,
    DumpRequest,
    RestoreRequest,
    task_condition,
    tree_condition,
)
from grenadine_sv.lifecycle.machine import State
from grenadine_sv.store.images import ImageStore
from tests.conftest import SupervisorDirs, free_port
from tests.integration.supervising import (
    TICKER,
    children_of,
    counter_command,
    hit,
    python_program,
    running_supervisor,
    wait_for,
    wait_state,
)
from tests.integration.supervisor_processes import Processes

pytestmark = [pytest.mark.root, pytest.mark.criu]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return bytes(response.read()).decode()


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the supervisor's /metrics (0 when the series does not exist yet)."""
    text = await trio.to_thread.run_sync(scrape, port)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def memory_hog(mebibytes: int) -> str:
    """Touches every page of `mebibytes` MiB with a pattern, then keeps checking samples of it."""
    return python_program(
        "import random, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"size = {mebibytes} << 20\n"
        "buf = bytearray(size)\n"
        "for page in range(size >> 12): buf[page << 12] = (page % 251) + 1\n"
        "n = 0\n"
        "while True:\n"
        "    for page in random.sample(range(size >> 12), 2000):\n"
        "        if buf[page << 12] != (page % 251) + 1:\n"
        "            print('CORRUPT', page, flush=True); sys.exit(3)\n"
        "    n += 1; print('ok', n, flush=True); time.sleep(0.05)\n"
    )


def criu_children() -> list[int]:
    """CRIU processes this test process started (CRIU rewrites its argv: match the binary)."""
    criu = os.fspath(find_criu().resolve())
    found = []
    for pid in children_of(os.getpid()):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if os.readlink(f"/proc/{pid}/exe") == criu:
                found.append(pid)
    return found


def partial_pages_bytes(store: ImageStore, program: str) -> int:
    """Bytes of memory pages CRIU has written so far into an unfinished image."""
    total = 0
    for path in (store.root / program).glob(".partial-*/criu/pages-*.img"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def count_lines(path: Path, word: bytes) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.startswith(word))


def hidden_entries(store: ImageStore, program: str) -> list[str]:
    program_dir = store.root / program
    if not program_dir.is_dir():
        return []
    return [entry.name for entry in program_dir.iterdir() if entry.name.startswith(".")]


async def test_criu_killed_mid_dump_leaves_the_program_running_and_no_image(
    sv_dirs: SupervisorDirs,
):
    port = free_port()
    config = sv_dirs.write_config(
        f"[programs.hog]\ncommand = {memory_hog(300)}\nstartsecs = 0.3\n",
        metrics_listen=f"127.0.0.1:{port}",
    )
    store = ImageStore(sv_dirs.state_dir)
    out = sv_dirs.stdout_log("hog")
    killed: list[int] = []

    async def kill_criu_while_it_writes_pages() -> None:
        with trio.fail_after(20):
            while partial_pages_bytes(store, "hog") < 16 << 20:
                await trio.sleep(0.001)
        [criu] = criu_children()
        os.kill(criu, signal.SIGKILL)
        killed.append(criu)

    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            pid = await wait_state(sv, "hog", State.RUNNING)
            await wait_for(lambda: count_lines(out, b"ok") >= 2, what="hog's memory touched")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_criu_while_it_writes_pages)
                with pytest.raises(ControlError, match="killed by SIGKILL") as failure:
                    await sv.operations.checkpoint_programs(["hog"], stop=False)

            # The same process goes on, neither stopped nor traced, its memory intact.
            assert killed
            assert sv.programs.runners["hog"].state == State.RUNNING
            assert sv.programs.runners["hog"].machine.pid == pid
            conditions = tree_condition(pid).values()
            assert len(conditions) == 2, "the init and the program"
            assert not any(condition.stopped for condition in conditions)
            assert all(condition.tracer_pid == 0 for condition in conditions)
            checks = count_lines(out, b"ok")
            await wait_for(lambda: count_lines(out, b"ok") >= checks + 5, what="more checks")
            # Nothing of the dump is listed, nothing of it is left on disk but its log.
            assert store.list("hog") == []
            assert hidden_entries(store, "hog") == []
            [kept_log] = (sv_dirs.state_dir / "dump-logs" / "hog").glob("dump-*.log")
            assert str(kept_log) in str(failure.value)
            assert kept_log.stat().st_mode & 0o777 == 0o600
            failures = "grenadine_checkpoint_failures_total"
            assert await metric(port, failures, program="hog", trigger="manual") == 1
            # CRIU's parasite, cut off mid-dump, returned the program to its own code but
            # stays mapped: reported, and harmless to later checkpoints and restores.
            assert sum(condition.parasite_mappings for condition in conditions) > 0
            assert any(e["event"] == "criu_parasite_left_mapped" for e in logs)
            [entry] = await sv.operations.checkpoint_programs(["hog"], stop=True)
            await sv.operations.restore_program("hog", entry["image"]["id"])
            await wait_state(sv, "hog", State.RUNNING)
            checks = count_lines(out, b"ok")
            await wait_for(lambda: count_lines(out, b"ok") >= checks + 5, what="checks restored")
    assert b"CORRUPT" not in out.read_bytes()
    [logged] = [e for e in logs if e["event"] == "checkpoint_failed"]
    assert "killed by SIGKILL" in logged["error"]


class CriuLeavingTheTaskStopped:
    """Stands for a CRIU that dies leaving the program in a group stop (not seen with real
    CRIU here, which the kernel detaches cleanly, but what the supervisor must not miss)."""

    binary = find_criu()

    def dump(self, request: DumpRequest) -> None:
        tasks = list(tree_condition(request.pid))
        for task in tasks:
            os.kill(task, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not all(getattr(task_condition(task), "stopped", False) for task in tasks):
            assert time.monotonic() < deadline, "SIGSTOP did not stop the init and the program"
            time.sleep(0.01)
        raise CriuError("dump", "simulated: criu died and left the task stopped", None)

    def restore(self, request: RestoreRequest) -> int:
        raise AssertionError("not used")


async def test_program_left_stopped_by_a_failed_dump_is_resumed(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    out = sv_dirs.stdout_log("ticker")
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            assert sv.checkpointing.service is not None
            sv.checkpointing.service.criu = CriuLeavingTheTaskStopped()  # type: ignore[assignment]
            pid = await wait_state(sv, "ticker", State.RUNNING)
            with pytest.raises(ControlError, match="simulated"):
                await sv.operations.checkpoint_programs(["ticker"], stop=False)
            conditions = tree_condition(pid).values()
            assert len(conditions) == 2, "the init and the program"
            assert not any(condition.stopped for condition in conditions)
            ticks = count_lines(out, b"tick")
            await wait_for(lambda: count_lines(out, b"tick") >= ticks + 3, what="ticking again")
            assert sv.programs.runners["ticker"].machine.pid == pid
    assert any(e["event"] == "program_resumed_after_failed_checkpoint" for e in logs)


class CriuWhoseProgramEnds:
    """Stands for a dump during which the program ends (a restart or a crash landing as CRIU
    seizes it, seen in the soak): the tree is killed, and CRIU fails as it then does."""

    binary = find_criu()

    def dump(self, request: DumpRequest) -> None:
        os.kill(request.pid, signal.SIGKILL)
        raise CriuError("dump", f"Unable to detach from {request.pid}: No such process", None)

    def restore(self, request: RestoreRequest) -> int:
        raise AssertionError("not used")


async def test_a_program_that_ends_during_its_dump_is_named_as_the_cause(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.2\n")
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            assert sv.checkpointing.service is not None
            sv.checkpointing.service.criu = CriuWhoseProgramEnds()  # type: ignore[assignment]
            await wait_state(sv, "ticker", State.RUNNING)
            with pytest.raises(ControlError, match=r"ticker ended while CRIU dumped it .*detach"):
                await sv.operations.checkpoint_programs(["ticker"], stop=False)
    [logged] = [e for e in logs if e["event"] == "checkpoint_failed"]
    assert logged["error"].startswith("ticker ended while CRIU dumped it")
    assert any(e["event"] == "program_gone_after_failed_checkpoint" for e in logs)


# Small until SIGUSR2, then holds 64 MiB more.
GROWER = python_program(
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "held = []\n"
    "def grow(*a):\n"
    "    block = bytearray(64 << 20)\n"
    "    for i in range(0, len(block), 4096): block[i] = 1\n"
    "    held.append(block); print('grown', flush=True)\n"
    "signal.signal(signal.SIGUSR2, grow)\n"
    "n = 0\n"
    "while True: n += 1; print('tick', n, flush=True); time.sleep(0.05)\n"
)


async def test_full_disk_during_a_dump_keeps_earlier_images_and_the_program(
    sv_dirs: SupervisorDirs,
):
    state_dir = sv_dirs.state_dir
    state_dir.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "gsv-test-full", str(state_dir)],
        check=True,
    )
    try:
        port = free_port()
        config = sv_dirs.write_config(
            f"[programs.grower]\ncommand = {GROWER}\nstartsecs = 0.2\n",
            metrics_listen=f"127.0.0.1:{port}",
        )
        store = ImageStore(state_dir)
        out = sv_dirs.stdout_log("grower")
        async with running_supervisor(config) as sv:
            pid = await wait_state(sv, "grower", State.RUNNING)
            [first] = await sv.operations.checkpoint_programs(["grower"], stop=False)
            os.kill(pid, signal.SIGUSR2)
            await wait_for(lambda: b"grown" in out.read_bytes(), what="64 MiB more held")
            with pytest.raises(ControlError) as failure:
                await sv.operations.checkpoint_programs(["grower"], stop=False)
            message = str(failure.value)
            assert "ENOSPC" in message
            assert "No space left on device" in message
            assert str(state_dir) in message
            failures = "grenadine_checkpoint_failures_total"
            assert await metric(port, failures, program="grower", trigger="manual") == 1
            # The program runs on, the earlier image is intact and nothing else is left.
            assert sv.programs.runners["grower"].machine.pid == pid
            ticks = count_lines(out, b"tick")
            await wait_for(lambda: count_lines(out, b"tick") >= ticks + 3, what="ticking on")
            [image] = store.list("grower")
            assert image.id == first["image"]["id"]
            store.verify(image)
            assert hidden_entries(store, "grower") == []
            # ... and restorable.
            await sv.operations.stop_programs(["grower"])
            result = await sv.operations.restore_program("grower", image.id)
            assert result["fallback"] is None
            assert result["state"] == "RUNNING"
            ticks = count_lines(out, b"tick")
            await wait_for(lambda: count_lines(out, b"tick") >= ticks + 3, what="restored ticks")
    finally:
        subprocess.run(["umount", str(state_dir)], check=True)


async def test_restore_onto_a_busy_port_names_the_cause_and_follows_the_fallback(
    sv_dirs: SupervisorDirs,
):
    strict_port, lenient_port, port = free_port(), free_port(), free_port()
    config = sv_dirs.write_config(
        f"[programs.strict]\ncommand = {counter_command(strict_port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{strict_port}" }}\nrestore_fallback = "fail"\n'
        f"[programs.lenient]\ncommand = {counter_command(lenient_port)}\n"
        f'ready = {{ tcp = "127.0.0.1:{lenient_port}" }}\nrestore_fallback = "cold"\n'
        "startretries = 10\n",
        metrics_listen=f"127.0.0.1:{port}",
    )
    async with running_supervisor(config) as sv:
        await wait_state(sv, "strict", State.RUNNING)
        await wait_state(sv, "lenient", State.RUNNING)
        assert (hit(strict_port), hit(lenient_port)) == (1, 1)
        await sv.operations.checkpoint_programs(["strict", "lenient"], stop=True)
        # The dumped instances are killed once their images are listed: wait for their exit.
        await wait_state(sv, "strict", State.STOPPED)
        await wait_state(sv, "lenient", State.STOPPED)
        zombies_before = zombie_children()
        squatters = [socket.create_server(("127.0.0.1", p)) for p in (strict_port, lenient_port)]
        lenient: dict[str, Any] = {}
        try:
            strict = await sv.operations.restore_program("strict", "latest")

            async def restore_lenient() -> None:
                lenient.update(await sv.operations.restore_program("lenient", "latest"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restore_lenient)
                # Free the port once the restore has failed on it: the squatter must not
                # satisfy the cold instance's ready probe (it is not that instance).
                restore_logs = sv_dirs.state_dir / "restore-logs" / "lenient"
                await wait_for(
                    lambda: any(
                        "Address already in use" in log.read_text()
                        for log in restore_logs.glob("restore-*.log")
                    ),
                    timeout=30,
                    what="lenient's restore failed",
                )
                for squatter in squatters:
                    squatter.close()
        finally:
            for squatter in squatters:
                squatter.close()
        assert strict["state"] == "FATAL"
        assert "Address already in use" in strict["reason"]
        assert "Address already in use" in lenient["fallback"]
        restore_log = lenient["fallback"].split("full log: ")[1].rstrip(")")
        assert "Address already in use" in Path(restore_log).read_text()
        for name in ("strict", "lenient"):
            assert await metric(port, "grenadine_restore_failures_total", program=name) == 1
        # The lenient one was started fresh (its counter begins again) once the port was free.
        await wait_for(lambda: _answers(lenient_port), timeout=20, what="lenient serving")
        assert hit(lenient_port) >= 1
        assert sv.programs.runners["strict"].state == State.FATAL
        # A failed restore leaves no zombie behind (the partly restored root is reaped).
        await wait_for(lambda: not zombie_children() - zombies_before, what="no new zombie")


def zombie_children() -> set[int]:
    zombies = set()
    for child in children_of(os.getpid()):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.add(child)
    return zombies


def _answers(port: int) -> bool:
    try:
        return hit(port) >= 1
    except (OSError, ValueError, IndexError):
        return False


def crasher(seconds: float) -> str:
    return python_program(f"import time, sys\ntime.sleep({seconds})\nsys.exit(1)\n")


async def ask(socket_path: Path, command: str, **args: Any) -> Any:
    """A control request from a worker thread: the supervisor runs in this thread's loop."""
    return await trio.to_thread.run_sync(lambda: control.request(socket_path, command, args, 10.0))


def status_latency(socket_path: Path) -> float:
    began = time.monotonic()
    control.request(socket_path, "status", {}, timeout=10.0)
    return time.monotonic() - began


async def test_signal_storm_is_coalesced_and_the_supervisor_stays_responsive(
    sv_dirs: SupervisorDirs,
):
    programs = "".join(
        f"[programs.{name}]\ncommand = {command}\nstartsecs = 0.1\nautorestart = 'always'\n"
        "[programs." + name + ".checkpoint]\non_signal = true\nkeep = 2\n"
        for name, command in (
            ("ticker1", TICKER),
            ("ticker2", TICKER),
            ("crasher1", crasher(0.3)),
            ("crasher2", crasher(0.5)),
        )
    )
    config = sv_dirs.write_config(programs)
    latencies: list[float] = []
    with capture_logs() as logs:
        async with running_supervisor(config) as sv:
            tickers = {n: await wait_state(sv, n, State.RUNNING) for n in ("ticker1", "ticker2")}
            storm_done = trio.Event()

            async def poll_status() -> None:
                while not storm_done.is_set():
                    latencies.append(await trio.to_thread.run_sync(status_latency, sv_dirs.socket))
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_status)
                for _ in range(100):
                    os.kill(os.getpid(), signal.SIGUSR1)
                    await trio.sleep(0.009)
                # (The kernel merges a signal sent while one is pending: not every one counts.)
                rounds_run = sv.checkpointing.signal_rounds
                await wait_for(lambda: len(latencies) >= 5, what="status asked meanwhile")
                storm_done.set()

            def rounds() -> int:
                return sum(1 for e in logs if e["event"] == "checkpoint_round")

            # Once the trigger is idle no round runs until the next signal: count them. (Up to
            # 20 rounds of dumps: the bound is for a loaded machine.)
            await wait_for(
                lambda: rounds_run.idle and not criu_children(), timeout=120, what="rounds done"
            )
            settled = rounds()
            assert 1 <= settled <= 20, f"{settled} rounds for 100 signals"
            restarts = sum(
                sv.programs.runners[n].machine.restart_count for n in ("crasher1", "crasher2")
            )
            assert restarts >= 2
            for name, pid in tickers.items():
                assert sv.programs.runners[name].state == State.RUNNING
                assert sv.programs.runners[name].machine.pid == pid
                assert any(i.trigger == "signal" for i in ImageStore(sv_dirs.state_dir).list(name))
            # Answered within the request's own bound (status_latency's timeout).
            await trio.to_thread.run_sync(status_latency, sv_dirs.socket)
    assert len(latencies) >= 5
    assert max(latencies) < 2.0, f"status took up to {max(latencies):.2f}s during the storm"
    assert not [e for e in logs if e["log_level"] in ("critical", "exception")]
    assert not [e for e in logs if e["event"] == "control_request_failed"]


async def test_twenty_control_clients_at_once_are_all_answered(sv_dirs: SupervisorDirs):
    config = sv_dirs.write_config(
        f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.1\n"
        f"[programs.crasher]\ncommand = {crasher(0.3)}\nstartsecs = 0.1\n"
        "autorestart = 'always'\n"
    )
    requests: list[tuple[str, dict[str, Any]]] = [
        ("status", {}),
        ("ping", {}),
        ("checkpoint", {"names": ["ticker"]}),
        ("restart", {"names": ["crasher"]}),
        ("no-such-command", {}),
    ]
    answers: list[str] = []

    def client(index: int) -> None:
        for offset in range(3):
            command, args = requests[(index + offset) % len(requests)]
            try:
                control.request(sv_dirs.socket, command, args, timeout=60.0)
            except ControlError as exc:
                answers.append(f"error:{command}:{exc}")
            else:
                answers.append(f"ok:{command}")

    async with running_supervisor(config) as sv:
        ticker = await wait_state(sv, "ticker", State.RUNNING)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(trio.to_thread.run_sync, client, index)
        assert len(answers) == 60
        assert not [a for a in answers if "without a reply" in a]
        assert sum(a.startswith("error:no-such-command:") for a in answers) == 12
        assert answers.count("ok:status") == 12
        assert answers.count("ok:ping") == 12
        assert sv.programs.runners["ticker"].machine.pid == ticker
        assert (await ask(sv_dirs.socket, "ping"))["pid"] == os.getpid()


def exchange(path: Path, payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Send `payload` raw, read one reply line, then whatever follows until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        # The server stops reading a line past its limit: the rest of a huge one may not go.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed without a reply (got {data!r})"
            data += chunk
        reply, rest = data.split(b"\n", 1)
        # Closed: an end of file, or a reset when the server left part of a huge line unread.
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                rest += chunk
    return json.loads(reply), rest


MALFORMED = {
    "not JSON": (b"this is not json\n", "not a JSON object"),
    "a JSON array": (b'["status"]\n', "must be a JSON object"),
    "a command that is not a string": (b'{"command": 5}\n', '"command"'),
    "an unknown command": (b'{"command": "frobnicate"}\n', "unknown command 'frobnicate'"),
    "bad arguments": (b'{"command": "prune", "args": {"keep": "x"}}\n', "'x'"),
    "invalid UTF-8": (b"\xff\xfe\n", "not a JSON object"),
    "nesting too deep": (b"[" * 200_000 + b"\n", "not a JSON object"),
    "a huge line": (b"x" * (2 << 20), "longer than 1048576 bytes"),
}


async def test_malformed_control_messages_get_an_error_and_a_closed_connection(
    sv_dirs: SupervisorDirs,
):
    config = sv_dirs.write_config(f"[programs.ticker]\ncommand = {TICKER}\nstartsecs = 0.1\n")
    async with running_supervisor(config) as sv:
        pid = await wait_state(sv, "ticker", State.RUNNING)
        for what, (payload, expected) in MALFORMED.items():
            reply, after = await trio.to_thread.run_sync(exchange, sv_dirs.socket, payload)
            assert reply["ok"] is False, what
            assert expected in reply["error"], (what, reply)
            assert after == b"", f"{what}: the connection stayed open"
            [status] = await ask(sv_dirs.socket, "status", names=["ticker"])
            assert (status["state"], status["pid"]) == ("RUNNING", pid), what
        # Well-formed requests keep their connection for the next one.
        lines = await trio.to_thread.run_sync(
            all_replies, sv_dirs.socket, b'{"command": "ping"}\n' * 2
        )
        assert [json.loads(line) for line in lines] == [
            {"ok": True, "result": {"pid": os.getpid()}}
        ] * 2


def all_replies(path: Path, payload: bytes) -> list[bytes]:
    """Send `payload`, say that nothing follows, and read every reply line until the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.splitlines()


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def unread_bytes(sock: trio.socket.SocketType) -> int:
    """Bytes sent on this Unix socket that its peer has not read yet (SIOCOUTQ)."""
    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    return int(struct.unpack("i", queued)[0])


async def connected(path: Path) -> trio.SocketStream:
    """A stream connected to the Unix socket at `path`. (trio's own connect takes the EAGAIN
    of a full backlog for a connection made.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    # A Unix socket connects at once or not at all: no EINPROGRESS.
                    sock.connect(os.fspath(path))
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@dataclass
class LongLineClient:
    """A client sending one long request line and never its newline."""

    stream: trio.SocketStream
    sent: bool = False
    reply: dict[str, Any] | None = None

    @property
    def settled(self) -> bool:
        """Answered, or every byte sent and read by the supervisor."""
        return self.reply is not None or (self.sent and unread_bytes(self.stream.socket) == 0)

    async def send(self, payload: bytes) -> None:
        # A refused client's line is left unread: the rest of it cannot go.
        with contextlib.suppress(trio.BrokenResourceError):
            await self.stream.send_all(payload)
        self.sent = True

    async def read_reply(self) -> None:
        data = b""
        # Closed with a reset when the supervisor left part of the line unread.
        with contextlib.suppress(trio.BrokenResourceError):
            while b"\n" not in data and (chunk := await self.stream.receive_some()):
                data += chunk
        self.reply = json.loads(data.split(b"\n", 1)[0]) if data else {}


LONG_LINE_CLIENTS = 300


async def test_clients_holding_long_unfinished_requests_cannot_grow_the_supervisor(
    sv_dirs: SupervisorDirs, processes: Processes
):
    config = sv_dirs.write_config("")
    supervisor = processes.supervisor(config, sv_dirs.state_dir)
    await wait_for(lambda: socket_is_live(sv_dirs.socket), timeout=30, what="control socket")
    assert (await ask(sv_dirs.socket, "ping"))["pid"] == supervisor.pid
    before = rss_bytes(supervisor.pid)
    clients: list[LongLineClient] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(LONG_LINE_CLIENTS):
                clients.append(LongLineClient(await connected(sv_dirs.socket)))
                nursery.start_soon(clients[-1].send, b"x" * MAX_LINE_BYTES)
                nursery.start_soon(clients[-1].read_reply)
            await wait_for(
                lambda: all(client.settled for client in clients),
                timeout=25,  # within the supervisor's 30 s for an idle client
                what="every long line read or refused",
            )
            grown = rss_bytes(supervisor.pid) - before
            assert await ask(sv_dirs.socket, "status") == []
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.stream.socket.close()
    assert grown < 64 << 20, f"{LONG_LINE_CLIENTS} clients grew the supervisor {grown >> 20} MiB"
    errors = [client.reply["error"] for client in clients if client.reply]
    assert len(errors) >= LONG_LINE_CLIENTS - LONG_LINE_SLOTS
    assert all("reading other long requests" in error for error in errors), set(errors)
    assert "send yours again later" in errors[0]
