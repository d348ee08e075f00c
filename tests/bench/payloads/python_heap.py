"""A daemon whose Python heap holds about MIB mebibytes of ordinary objects until SIGTERM.

    python python_heap.py MIB

Records (dicts of ints, floats, short strings and lists) like an application cache, not one
repeated byte: what an image of a real Python service compresses like. Prints "ready" once the
resident size reaches MIB.
"""

from __future__ import annotations

import os
import random
import signal
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
WORDS = ["alpha", "beta", "gamma", "delta", "order", "user", "session", "cart", "price", "eu"]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    target = int(sys.argv[1]) << 20
    rng = random.Random(42)
    held: list[dict[str, object]] = []
    while resident_bytes() < target:
        for _ in range(10_000):
            n = len(held)
            held.append(
                {
                    "id": n,
                    "name": f"{rng.choice(WORDS)}-{rng.getrandbits(32):08x}",
                    "score": rng.random(),
                    "tags": [rng.choice(WORDS) for _ in range(3)],
                    "payload": rng.randbytes(64).hex(),
                }
            )
    print(f"ready {len(held)} records, {resident_bytes() >> 20} MiB", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
