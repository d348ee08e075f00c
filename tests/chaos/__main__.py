"""Run the chaos harness by hand: `python -m tests.chaos --minutes 30` (root, CRIU);
`contrib/bootstrap chaos [--minutes N] [--seed S]` runs this.

Prints each episode's seed, where kills landed and the invariant checks; a failing seed is
appended to --failures (default ./chaos-failures.txt) with the command that replays it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

from tests.chaos.harness import KILL_TARGETS, OPERATIONS, Options, format_report, run_episodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="run episodes this long")
    parser.add_argument("--seed", type=int, default=None, help="first episode's seed (replay)")
    parser.add_argument("--episodes", type=int, default=None, help="stop after this many")
    parser.add_argument("--iterations", type=int, default=12, help="operations per episode")
    parser.add_argument("--programs", type=int, default=3)
    parser.add_argument("--print-interval", type=float, default=0.2, help="seconds between lines")
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--kill-targets", default=",".join(KILL_TARGETS))
    parser.add_argument("--take-back-targets", default="dump,sealing,restore")
    parser.add_argument("--kill-share", type=float, default=0.7)
    parser.add_argument(
        "--lazy-share", type=float, default=0.5, help='share of programs with restore_mode "lazy"'
    )
    parser.add_argument(
        "--recovery-bound", type=float, default=30.0, help="seconds a new supervisor may take"
    )
    parser.add_argument("--keep-going", action="store_true", help="go on after a violation")
    parser.add_argument(
        "--keep-dir",
        action="store_true",
        help="keep each episode's directory (a failing one is always kept)",
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="upload to a real object store (SeaweedFS), restore from it, kill inside both",
    )
    parser.add_argument("--failures", type=Path, default=Path("chaos-failures.txt"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the chaos harness needs root (namespaces, CRIU)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1, 1_000_000)
    episodes = args.episodes
    minutes = args.minutes
    if minutes is None and episodes is None:
        # A seed alone replays that episode; nothing at all runs for ten minutes.
        if args.seed is not None:
            episodes = 1
        else:
            minutes = 10.0
    options = Options(
        iterations=args.iterations,
        programs=args.programs,
        operations=tuple(args.operations.split(",")),
        kill_targets=tuple(args.kill_targets.split(",")),
        take_back_targets=tuple(args.take_back_targets.split(",")),
        kill_share=args.kill_share,
        lazy_share=args.lazy_share,
        print_interval=args.print_interval,
        keep_dir=args.keep_dir,
        keep_failing_dir=True,
        recovery_bound=args.recovery_bound,
        remote=args.remote,
    )

    def log(line: str) -> None:
        print(line, flush=True)

    # A SIGTERM ends the run like ^C: the episode in progress ends what it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.monotonic()
    tally, failed = run_episodes(
        seed,
        options,
        minutes=minutes,
        episodes=episodes,
        keep_going=args.keep_going,
        log=log,
    )
    print(format_report(tally, failed, time.monotonic() - began), flush=True)
    if failed:
        replay = " ".join(a for a in sys.argv[1:] if a) or ""
        with args.failures.open("a") as record:
            for bad in failed:
                record.write(
                    f"seed {bad}: python -m tests.chaos --seed {bad} --episodes 1 "
                    f"(run was: {replay})\n"
                )
                for violation in tally.violations:
                    if violation.startswith(f"seed {bad},"):
                        record.write(f"  {violation}\n")
        print(f"failing seeds written to {args.failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
