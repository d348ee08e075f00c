"""What copying files into the image (checkpoint.snapshot, the private /tmp) adds to the time
the program is frozen: CRIU's frozen_time of a leave-running checkpoint of an idle program,
without a snapshot and with one of SIZE MiB (one file) plus 1000 small files.

    python -m tests.bench.snapshot_cost [--sizes 16,64] [--runs 3]

Needs root and CRIU; prints one line per size (median of the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import trio

from grenadine_sv.lifecycle.machine import State
from tests.conftest import SupervisorDirs
from tests.integration.supervising import running_supervisor, wait_state

IDLE = json.dumps([sys.executable, "-c", "import time; time.sleep(3600)"])


def fill(directory: Path, mib: int) -> None:
    if mib:
        with open(directory / "big", "wb") as big:
            for _ in range(mib):
                big.write(os.urandom(1 << 20))
        small = directory / "small"
        small.mkdir()
        for number in range(1000):
            (small / str(number)).write_bytes(os.urandom(512))


async def frozen_seconds(mib: int, runs: int) -> list[float]:
    root = Path(tempfile.mkdtemp(prefix="gsv-bench-", dir="/tmp"))
    data = Path(tempfile.mkdtemp(prefix="grenadine-bench-snapshot-", dir="/var/tmp"))
    try:
        fill(data, mib)
        dirs = SupervisorDirs(root)
        snapshot = f'snapshot = ["{data}"]\n' if mib else ""
        config = dirs.write_config(
            f"[programs.idle]\ncommand = {IDLE}\nstartsecs = 0.1\nprivate_tmp = false\n"
            f"[programs.idle.checkpoint]\nkeep = 1\n{snapshot}"
        )
        figures = []
        async with running_supervisor(config) as sv:
            await wait_state(sv, "idle", State.RUNNING)
            for _ in range(runs):
                [entry] = await sv.operations.checkpoint_programs(["idle"], stop=False)
                figures.append(entry["image"]["dump_stats"]["frozen_time"] / 1e6)
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


async def measure(sizes: list[int], runs: int) -> None:
    base = statistics.median(await frozen_seconds(0, runs))
    print(f"no snapshot: frozen {base * 1000:.0f} ms (median of {runs})")
    for mib in sizes:
        with_copy = statistics.median(await frozen_seconds(mib, runs))
        added = (with_copy - base) * 1000
        label = f"snapshot of {mib} MiB + 1000 x 512 B"
        print(f"{label}: frozen {with_copy * 1000:.0f} ms (+{added:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.snapshot_cost", description=__doc__
    )
    parser.add_argument("--sizes", default="16,64")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trio.run(measure, [int(size) for size in args.sizes.split(",")], args.runs)


if __name__ == "__main__":
    main()
