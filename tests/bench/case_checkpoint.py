"""Cases 1 and 4: `grenadine-sv checkpoint NAME` against `criu dump` by hand, and its image write
speed against `dd ... conv=fdatasync`, on a program holding N MiB of touched memory.

Each round measures the three in turn (the order reversed every other round), each after the
page cache's dirty pages were written back, all into the filesystem of the state dir; one
untimed checkpoint and one untimed raw dump come first.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grenadine_sv.criu.binary import find_criu
from grenadine_sv.store.images import ImageStore
from tests.bench.baselines import DiskWrite, RawDump, dd_write, raw_criu_dump, settle_disk
from tests.bench.grenadine import GrenadineSupervisor
from tests.bench.procs import BenchError, scratch_dir
from tests.bench.programs import memory_hog, wait_hogs_ready
from tests.bench.settings import Settings
from tests.bench.stats import Comparison, Target

MICROSECONDS = 1e6
# Below this size fixed per-command costs dominate; the issue sets the targets from 256 MiB.
TARGET_FROM_MIB = 256
# Issue 14: the command against a raw dump charged the same fsync.
DURABLE_TARGETS = {256: Target("<=", 1.25), 1024: Target("<=", 1.15)}
PROGRAM = "hog"


@dataclass(frozen=True)
class SupervisedCheckpoint:
    seconds: float
    """From the command issued until it exits, the image listed."""
    service_seconds: float
    """The supervisor's own figure: dump, facts, checksums, fsync, rename (its log)."""
    image_bytes: int
    stats: dict[str, int]


def supervised_checkpoint(sv: GrenadineSupervisor) -> SupervisedCheckpoint:
    began = time.monotonic()
    output = sv.run_cli("checkpoint", PROGRAM, "--json")
    seconds = time.monotonic() - began
    [entry] = json.loads(output)
    image = entry["image"]
    if image["id"] not in {m.id for m in ImageStore(sv.state_dir).list(PROGRAM)}:
        raise BenchError(f"image {image['id']} is not listed after its checkpoint command")
    done = [e for e in sv.log_events("checkpoint_done") if e.get("image_id") == image["id"]]
    if not done:
        raise BenchError(f"no checkpoint_done line for image {image['id']} in {sv.log_path}")
    # Untimed: every run starts from an empty store, so no run pays for pruning.
    sv.request("prune", name=PROGRAM, keep=0)
    return SupervisedCheckpoint(
        seconds, float(done[0]["duration_seconds"]), int(image["image_bytes"]), image["dump_stats"]
    )


@dataclass
class Rounds:
    ours: list[SupervisedCheckpoint]
    raw: list[RawDump]
    disk: list[DiskWrite]


def measure_size(settings: Settings, mebibytes: int) -> Rounds:
    criu = find_criu()
    rounds = Rounds([], [], [])
    with scratch_dir("gsvb-ckpt-") as root:
        program = memory_hog(PROGRAM, mebibytes, {"keep": 2})
        profile = settings.profile(f"checkpoint-{mebibytes}MiB")
        with GrenadineSupervisor(root, [program], profile) as sv:
            wait_hogs_ready(sv, [PROGRAM])
            pid = sv.pid_of(PROGRAM)
            scratch = sv.state_dir / "bench-baselines"
            scratch.mkdir()

            def ours() -> None:
                rounds.ours.append(supervised_checkpoint(sv))

            def raw() -> None:
                images = scratch / f"raw-{len(rounds.raw)}"
                rounds.raw.append(raw_criu_dump(criu, pid, images))
                shutil.rmtree(images)

            def disk() -> None:
                size = rounds.ours[-1].image_bytes if rounds.ours else mebibytes << 20
                rounds.disk.append(dd_write(scratch / "dd.bin", size))

            # Untimed: the first dump of a process is slower whoever makes it (seen up to 5x
            # at 1 GiB), and the supervisor's first checkpoint imports pycriu's image readers.
            settle_disk()
            supervised_checkpoint(sv)
            raw_criu_dump(criu, pid, scratch / "warm-up")
            shutil.rmtree(scratch / "warm-up")
            steps: list[Callable[[], None]] = [ours, raw, disk]
            for number in range(settings.runs):
                for step in steps if number % 2 == 0 else reversed(steps):
                    settle_disk()
                    step()
    return rounds


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def comparisons_for(mebibytes: int, rounds: Rounds) -> list[Comparison]:
    ours, raw, disk = rounds.ours, rounds.raw, rounds.disk
    targeted = mebibytes >= TARGET_FROM_MIB
    frozen_ours = [c.stats.get("frozen_time", 0) / MICROSECONDS for c in ours]
    frozen_raw = [r.stats.get("frozen_time", 0) / MICROSECONDS for r in raw]
    details: dict[str, Any] = {
        "image_bytes": ours[0].image_bytes,
        "median_command_seconds": _median([c.seconds for c in ours]),
        "median_supervisor_seconds": _median([c.service_seconds for c in ours]),
        "median_cli_and_socket_seconds": _median([c.seconds - c.service_seconds for c in ours]),
        "median_raw_dump_seconds": _median([r.seconds for r in raw]),
        "median_raw_fsync_seconds": _median([r.fsync_seconds for r in raw]),
    }
    for key in ("freezing_time", "frozen_time", "memdump_time", "memwrite_time"):
        details[f"median_ours_criu_{key}_seconds"] = _median(
            [c.stats.get(key, 0) / MICROSECONDS for c in ours]
        )
        details[f"median_raw_criu_{key}_seconds"] = _median(
            [r.stats.get(key, 0) / MICROSECONDS for r in raw]
        )
    case = f"1. checkpoint {mebibytes} MiB"
    return [
        Comparison(
            case=case,
            metric="wall time",
            unit="s",
            ours_label="checkpoint cmd",
            baseline_label="criu dump",
            ours=tuple(c.seconds for c in ours),
            baseline=tuple(r.seconds for r in raw),
            target=Target("<=", 1.10) if targeted else None,
            details=details,
        ),
        Comparison(
            case=case,
            metric="wall time, durable baseline",
            unit="s",
            ours_label="checkpoint cmd",
            baseline_label="criu dump + fsync",
            ours=tuple(c.seconds for c in ours),
            baseline=tuple(r.seconds + r.fsync_seconds for r in raw),
            target=DURABLE_TARGETS.get(mebibytes),
            note="criu dump by hand leaves its image in the page cache; grenadine-sv makes "
            "every image file durable (fsync) before listing it: this row charges the "
            "baseline the same fsync",
        ),
        Comparison(
            case=case,
            metric="frozen time",
            unit="s",
            ours_label="checkpoint cmd",
            baseline_label="criu dump",
            ours=tuple(frozen_ours),
            baseline=tuple(frozen_raw),
            target=Target("<=", 1.05),
        ),
        Comparison(
            case=f"4. image write {mebibytes} MiB",
            metric="throughput",
            unit="B/s",
            ours_label="checkpoint cmd",
            baseline_label="dd fdatasync",
            ours=tuple(c.image_bytes / c.seconds for c in ours),
            baseline=tuple(d.bytes_per_second for d in disk),
            target=Target(">=", 0.8) if targeted else None,
            note="image bytes / wall time of the checkpoint command (fsynced before listing) "
            "against dd of the same size with conv=fdatasync, same filesystem",
        ),
        Comparison(
            case=f"4. image write {mebibytes} MiB",
            metric="throughput, CRIU by hand",
            unit="B/s",
            ours_label="criu dump + fsync",
            baseline_label="dd fdatasync",
            ours=tuple(r.image_bytes / (r.seconds + r.fsync_seconds) for r in raw),
            baseline=tuple(d.bytes_per_second for d in disk),
            note="what CRIU alone reaches: its image bytes / (criu dump + fsync) against the "
            "same dd, the ceiling of the row above",
        ),
    ]


def run(settings: Settings) -> list[Comparison]:
    found: list[Comparison] = []
    for mebibytes in settings.sizes_mib:
        found += comparisons_for(mebibytes, measure_size(settings, mebibytes))
    return found
