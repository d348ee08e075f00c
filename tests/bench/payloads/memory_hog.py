"""A daemon holding MIB mebibytes of touched memory until SIGTERM.

    python memory_hog.py MIB

It prints "ready" once every page is written, then waits for signals.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mebibytes = int(sys.argv[1])
    # Repeating one non-zero byte writes every page (a zero-filled buffer may stay unmapped).
    held = bytearray(b"\x5a") * (mebibytes << 20)
    print(f"ready {len(held)}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
