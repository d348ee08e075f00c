"""What the sandbox's init (tini) costs: start time and image size, with and without it.

    python -m tests.bench.init_cost [--runs N]

Start time: from spawn_sandbox's call until the program (`sleep`) has exec'ed, as the median
of N alternating runs. Image size: CRIU image bytes of the same `sleep`, dumped with and
without the init. Needs root, tini and CRIU; prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import trio

from grenadine_sv.criu.binary import find_criu
from grenadine_sv.criu.client import Criu, DumpRequest
from grenadine_sv.sandbox import SandboxProcess, SandboxSpec, become_subreaper, spawn_sandbox
from grenadine_sv.sandbox.init import TINI

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def spec(anchor: str, init: str | None) -> SandboxSpec:
    return SandboxSpec(
        name="bench",
        command=("sleep", "1000"),
        environment={"PATH": PATH},
        root_anchor=anchor,
        init=init,
    )


def program_pid(process: SandboxProcess) -> int:
    if not process.under_init:
        return process.pid
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 10
    while not (listed := children.read_text().split()):
        if time.monotonic() > deadline:
            raise RuntimeError("the init started no program within 10 s")
        time.sleep(0.0005)
    return int(listed[0])


def wait_exec(pid: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not exec sleep within 10 s")
        time.sleep(0.0005)


async def end(process: SandboxProcess) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()
    process.close()


async def start_seconds(anchor: str, init: str | None, null: int) -> float:
    began = time.perf_counter()
    process = await spawn_sandbox(spec(anchor, init), null, null)
    wait_exec(program_pid(process))
    elapsed = time.perf_counter() - began
    await end(process)
    return elapsed


async def image_bytes(anchor: str, init: str | None, null: int, criu: Criu) -> int:
    process = await spawn_sandbox(spec(anchor, init), null, null)
    wait_exec(program_pid(process))
    images = Path(tempfile.mkdtemp(prefix="grenadine-bench-init-"))
    try:
        request = DumpRequest(pid=process.pid, images_dir=images, leave_running=True)
        await trio.to_thread.run_sync(criu.dump, request)
        return sum(f.stat().st_size for f in images.iterdir() if f.name != request.log_name)
    finally:
        await end(process)
        shutil.rmtree(images)


async def measure(runs: int) -> None:
    become_subreaper()
    anchor = tempfile.mkdtemp(prefix="grenadine-bench-anchor-")
    read_fd, null = os.pipe()
    try:
        times: dict[str, list[float]] = {"without init": [], "with tini": []}
        for _ in range(runs):
            times["without init"].append(await start_seconds(anchor, None, null))
            times["with tini"].append(await start_seconds(anchor, TINI, null))
        for label, seconds in times.items():
            print(
                f"start, {label}: median {statistics.median(seconds) * 1000:.1f} ms ({runs} runs)"
            )
        criu = Criu(find_criu())
        without = await image_bytes(anchor, None, null, criu)
        with_init = await image_bytes(anchor, TINI, null, criu)
        print(f"image of sleep, without init: {without} bytes; with tini: {with_init} bytes")
        print(f"tini adds {with_init - without} bytes to the image")
    finally:
        os.close(read_fd)
        os.close(null)
        os.rmdir(anchor)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.init_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    trio.run(measure, parser.parse_args().runs)


if __name__ == "__main__":
    main()
