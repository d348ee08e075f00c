"""Case 5: many programs checkpointed by one `kill -USR1` to the supervisor, from the signal
until every program's image is listed, against the sum of raw `criu dump` times of the same
programs (one after the other, as a shell loop over them would do). One untimed round by signal
comes first."""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import time
from pathlib import Path

from grenadine_sv.criu.binary import find_criu
from grenadine_sv.store.images import ImageStore
from grenadine_sv.supervisor.checkpointing import PARALLEL_CHECKPOINTS
from tests.bench.baselines import raw_criu_dump, settle_disk
from tests.bench.grenadine import GrenadineSupervisor
from tests.bench.procs import BenchError, scratch_dir, wait_until
from tests.bench.programs import memory_hog, wait_hogs_ready
from tests.bench.settings import Settings
from tests.bench.stats import Comparison

IMAGE_DIR = re.compile(r"[0-9a-f]{32}")
SECONDS_PER_PROGRAM = 10.0
MICROSECONDS = 1e6


def has_image(state_dir: Path, program: str) -> bool:
    """Whether an image of `program` is listed: its directory got its final name (by the
    rename that publishes it), which is cheaper to poll than reading every meta.json."""
    try:
        return any(
            IMAGE_DIR.fullmatch(entry) for entry in os.listdir(state_dir / "images" / program)
        )
    except FileNotFoundError:
        return False


def run(settings: Settings) -> list[Comparison]:
    criu = find_criu()
    names = [f"hog{number:02d}" for number in range(settings.many_programs)]
    programs = [memory_hog(n, settings.many_mib, {"on_signal": True, "keep": 2}) for n in names]
    ours: list[float] = []
    by_hand: list[float] = []
    supervisor_seconds: list[float] = []
    frozen: list[float] = []
    with (
        scratch_dir("gsvb-many-") as root,
        GrenadineSupervisor(root, programs, settings.profile("many")) as sv,
    ):
        wait_hogs_ready(sv, names)
        pids = {entry["name"]: int(entry["pid"]) for entry in sv.status()}
        store = ImageStore(sv.state_dir)
        baselines = sv.state_dir / "bench-baselines"
        baselines.mkdir()

        def by_signal() -> None:
            seen = len(sv.log_events("checkpoint_done"))
            settle_disk()
            began = time.monotonic()
            os.kill(sv.pid, signal.SIGUSR1)
            try:
                done_at = wait_until(
                    lambda: all(has_image(sv.state_dir, name) for name in names),
                    SECONDS_PER_PROGRAM * len(names),
                    f"an image of each of {len(names)} programs after SIGUSR1",
                )
            except BenchError as exc:
                failed = sv.log_events("checkpoint_failed")
                raise BenchError(f"{exc}; failures: {failed[-3:]}") from exc
            ours.append(done_at - began)
            listed = store.list()
            if sorted(image.program for image in listed) != sorted(names):
                raise BenchError(f"expected one image per program, listed: {len(listed)}")
            done = sv.log_events("checkpoint_done")[seen:]
            supervisor_seconds.append(sum(float(e["duration_seconds"]) for e in done))
            frozen.append(statistics.median(float(e["frozen_seconds"]) for e in done))
            sv.request("prune", keep=0)

        def one_by_one() -> None:
            total = 0.0
            for name in names:
                settle_disk()
                images = baselines / name
                total += raw_criu_dump(criu, pids[name], images).seconds
                shutil.rmtree(images)
            by_hand.append(total)

        # Untimed: the first dump of each process is slower, whoever makes it.
        by_signal()
        ours.clear()
        supervisor_seconds.clear()
        frozen.clear()
        steps = [by_signal, one_by_one]
        for number in range(settings.runs):
            for step in steps if number % 2 == 0 else reversed(steps):
                step()
    count = len(names)
    return [
        Comparison(
            case=f"5. {count} programs, one USR1",
            metric="all checkpointed",
            unit="s",
            ours_label="kill -USR1",
            baseline_label=f"sum of {count} criu dumps",
            ours=tuple(ours),
            baseline=tuple(by_hand),
            note=f"{count} programs of {settings.many_mib} MiB each; the supervisor dumps "
            f"{PARALLEL_CHECKPOINTS} at a time (one per core: CRIU is CPU-bound while it "
            "freezes and copies memory), and fsyncs each image before listing it; the sum "
            "of raw dumps does not fsync",
            details={
                "parallel_checkpoints": PARALLEL_CHECKPOINTS,
                "median_sum_of_supervisor_checkpoint_seconds": round(
                    statistics.median(supervisor_seconds), 4
                ),
                "median_frozen_seconds_per_program": round(statistics.median(frozen), 4),
            },
        )
    ]
