"""Case 2: a service that takes seconds to warm up (it builds an in-memory search index before it
listens), from `grenadine-sv start` to its first correct answer, against `grenadine-sv restore`
of a checkpoint taken once it was warm, to its first correct answer: eager (all memory back
first) and lazy (`restore_mode = "lazy"`, a second definition of the same service)."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from tests.bench.baselines import settle_disk
from tests.bench.grenadine import GrenadineSupervisor
from tests.bench.payloads.warm_service import document
from tests.bench.procs import BenchError, scratch_dir, wait_until
from tests.bench.programs import free_port, warm_service
from tests.bench.settings import Settings
from tests.bench.stats import Comparison, Target

PROGRAM = "search"
LAZY_PROGRAM = "search_lazy"
ANSWER_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0


def http_get(port: int, path: str) -> bytes | None:
    """The body of a 200 answer, or None (refused, reset, another status)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.0 200") else None


def correct_answer(port: int, documents: int) -> Callable[[], bool]:
    """True once the service answers with the last document it indexes (so it is warm)."""
    number = documents - 1
    expected = document(number).encode()
    return lambda: http_get(port, f"/doc/{number}") == expected


def time_to_answer(
    sv: GrenadineSupervisor, args: tuple[str, ...], answered: Callable[[], bool]
) -> tuple[float, str]:
    """Seconds from issuing `grenadine-sv ARGS` to the first correct answer; the command's
    output (it may still be finishing when the answer comes)."""
    settle_disk()
    began = time.monotonic()
    command = subprocess.Popen(
        sv.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        answered_at = wait_until(answered, ANSWER_TIMEOUT, f"an answer after {' '.join(args)}")
    finally:
        try:
            output, errors = command.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            command.kill()
            output, errors = command.communicate()
    if command.returncode != 0:
        raise BenchError(f"grenadine-sv {' '.join(args)} failed: {errors.strip()}")
    return answered_at - began, output


def stop(sv: GrenadineSupervisor, program: str = PROGRAM) -> None:
    sv.request("stop", names=[program])
    if not sv.all_in_state("STOPPED", [program]):
        raise BenchError(f"{program} did not stop: {sv.status()}")


def warm_image(sv: GrenadineSupervisor, program: str, answered: Callable[[], bool]) -> Any:
    """Start `program` cold, checkpoint it once warm, stop it: the image (its JSON)."""
    time_to_answer(sv, ("start", program), answered)
    [entry] = json.loads(sv.run_cli("checkpoint", program, "--json"))
    stop(sv, program)
    return entry["image"]


def run(settings: Settings) -> list[Comparison]:
    documents = settings.warm_documents
    port = free_port()
    answered = correct_answer(port, documents)
    cold: list[float] = []
    restored: list[float] = []
    restored_lazy: list[float] = []
    # Both definitions listen on one port; only one of them runs at a time.
    lazy = warm_service(LAZY_PROGRAM, port, documents)
    lazy = replace(lazy, settings={**lazy.settings, "restore_mode": "lazy"})
    with (
        scratch_dir("gsvb-rst-") as root,
        GrenadineSupervisor(
            root, [warm_service(PROGRAM, port, documents), lazy], settings.profile("restore")
        ) as sv,
    ):
        image = warm_image(sv, PROGRAM, answered)
        lazy_image = warm_image(sv, LAZY_PROGRAM, answered)

        def from_scratch() -> None:
            seconds, _ = time_to_answer(sv, ("start", PROGRAM), answered)
            cold.append(seconds)
            stop(sv)

        def restore(program: str, image_id: str, into: list[float]) -> None:
            seconds, output = time_to_answer(sv, ("restore", program, image_id, "--json"), answered)
            outcome = json.loads(output)
            if outcome.get("fallback"):
                raise BenchError(f"the restore fell back: {outcome['fallback']}")
            into.append(seconds)
            stop(sv, program)

        steps: list[Callable[[], None]] = [
            from_scratch,
            partial(restore, PROGRAM, image["id"], restored),
            partial(restore, LAZY_PROGRAM, lazy_image["id"], restored_lazy),
        ]
        for number in range(settings.runs):
            for step in steps if number % 2 == 0 else reversed(steps):
                step()
        restore_durations = [
            float(e["duration_seconds"])
            for e in sv.log_events("restore_done")
            if e.get("program") == PROGRAM
        ]
    details: dict[str, Any] = {
        "documents": documents,
        "image_bytes": image["image_bytes"],
        "memory_bytes": image["memory_bytes"],
        "median_supervisor_restore_seconds": round(statistics.median(restore_durations), 4),
    }
    note = (
        f"a search service indexing {documents} generated documents "
        f"({image['memory_bytes'] / (1 << 20):.0f} MiB dumped) before it listens; "
        "from `grenadine-sv start` or `grenadine-sv restore NAME IMAGE` issued until it "
        "answers with the last indexed document"
    )

    def against_cold_start(
        case: str,
        label: str,
        runs: list[float],
        note: str = note,
        details: dict[str, Any] | None = None,
    ) -> Comparison:
        return Comparison(
            case=case,
            metric="to first correct answer",
            unit="s",
            ours_label=label,
            baseline_label="cold start",
            ours=tuple(runs),
            baseline=tuple(cold),
            target=Target(">=", 50.0),
            inverse=True,
            note=note,
            details=details or {},
        )

    return [
        against_cold_start("2. restore vs cold start", "restore", restored, details=details),
        against_cold_start(
            "2. lazy restore vs cold start",
            "lazy restore",
            restored_lazy,
            note=note + '; restore_mode = "lazy": memory comes back while it answers',
        ),
    ]
