"""Run the benchmark suite: python -m tests.bench [--quick] [--only CASE ...] [--runs N].

Prints a Markdown table and writes it, with a JSON file of every figure, to the results
directory (bench-results/ at the top of the repository by default). Needs root and CRIU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from grenadine_sv.criu.binary import CriuNotFound, find_criu
from tests.bench import case_checkpoint, case_lazy, case_many, case_restore, case_supervision
from tests.bench.machine import machine_facts
from tests.bench.procs import BenchError
from tests.bench.profiling import find_py_spy
from tests.bench.report import json_report, markdown_report
from tests.bench.settings import FULL, QUICK, Settings
from tests.bench.stats import Comparison

REPOSITORY = Path(__file__).resolve().parents[2]
CASES: dict[str, Callable[[Settings], list[Comparison]]] = {
    "checkpoint": case_checkpoint.run,
    "restore": case_restore.run,
    "supervision": case_supervision.run,
    "many": case_many.run,
    "lazy": case_lazy.run,
}
CASE_ITEMS = {"checkpoint": "1 and 4", "restore": "2", "supervision": "3", "many": "5", "lazy": "6"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="each case once at the smallest size (< 1 minute)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CASES),
        help="run only these cases: "
        + ", ".join(f"{name} (issue items {items})" for name, items in CASE_ITEMS.items()),
    )
    parser.add_argument("--runs", type=int, help="alternating runs per figure")
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="MiB of touched memory for the checkpoint case, comma-separated (e.g. 16,256)",
    )
    parser.add_argument(
        "--lazy-sizes",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="MiB of memory of the service restored eager and lazy (case 6), comma-separated",
    )
    parser.add_argument(
        "--py-spy",
        nargs="?",
        const="py-spy",
        metavar="PATH",
        help="record each case's grenadine-sv with py-spy into the results directory "
        "(profile-*.txt and a summary of each); py-spy pauses the process to sample, "
        "so the figures of such a run are not comparable",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=REPOSITORY / "bench-results",
        help="where the Markdown and JSON files go (default: bench-results/)",
    )
    return parser.parse_args(argv)


def check_host(cases: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the programs run in new namespaces and CRIU needs root")
    try:
        find_criu()
    except CriuNotFound as exc:
        raise BenchError(f"{exc} (contrib/bootstrap setup installs it)") from exc
    if "supervision" in cases and importlib.util.find_spec("supervisor") is None:
        raise BenchError(
            "supervisord is not installed in this environment: "
            "pip install -e '.[bench]' (contrib/bootstrap bench does it)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = (
            (QUICK if args.quick else FULL)
            .with_runs(args.runs)
            .with_sizes(args.sizes)
            .with_lazy_sizes(args.lazy_sizes)
        )
        if args.py_spy is not None:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            settings = settings.with_profiling(find_py_spy(args.py_spy), args.results_dir)
    except (ValueError, BenchError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    cases = args.only or list(CASES)
    try:
        check_host(cases)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    machine = machine_facts()
    comparisons: list[Comparison] = []
    failures: list[str] = []
    began = time.monotonic()
    for name in cases:
        print(f"bench: {name} (issue items {CASE_ITEMS[name]})...", file=sys.stderr, flush=True)
        case_began = time.monotonic()
        try:
            comparisons += CASES[name](settings)
        except BenchError as exc:
            failures.append(f"{name}: {exc}")
            print(f"bench: {name} FAILED: {exc}", file=sys.stderr, flush=True)
        print(
            f"bench: {name} took {time.monotonic() - case_began:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    recorded = settings.as_dict() | {
        "cases": cases,
        "seconds": round(time.monotonic() - began, 1),
        "failures": failures,
    }
    markdown = markdown_report(comparisons, machine, recorded)
    if failures:
        markdown += "\nFailed cases:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(markdown)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{settings.mode}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    (args.results_dir / f"{stem}.md").write_text(markdown)
    (args.results_dir / f"{stem}.json").write_text(json_report(comparisons, machine, recorded))
    print(f"bench: wrote {args.results_dir / stem}.md and .json", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
