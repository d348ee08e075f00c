"""The program the chaos harness supervises: it holds a random token in memory, serves it over
TCP and prints continuously.

    python -I -S token_service.py --port P --name NAME --run RUN [--ballast-mib M]
        [--print-interval S]

At start it draws a token (never seen before), fills M MiB of ballast derived from that token
and prints `tick N token=T` every S seconds. It prints `hup token=T` after each SIGHUP and
ignores SIGUSR2 (signals the harness sends through `grenadine-sv signal`). Each TCP
connection to 127.0.0.1:P receives one line, `token=T ballast=ok|BAD ticks=N`, then the
connection is closed: `ballast=ok` says the ballast still hashes as it did at start (memory
kept whole). A restore from an image answers with the token the image was taken with; a cold
start with a new one. The token is also kept as `CHAOSTOKEN:T` so that the harness can read
which token an image holds from its pages.

`--name` and `--run` are not used by the program: they let the harness count its instances
from /proc/PID/cmdline. While the port is taken (by another copy) it keeps retrying, so a
second copy stays visible instead of exiting. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import select
import signal
import socket
import sys
import time
import uuid
from types import FrameType

MIB = 1 << 20


def bind(port: int, retry_seconds: float) -> socket.socket:
    """A listening socket on the port, retrying while another process holds it."""
    while True:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
        except OSError as exc:
            listener.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            print(f"port {port} is taken, retrying", flush=True)
            time.sleep(retry_seconds)
            continue
        listener.listen(16)
        return listener


def stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


HUPS: list[int] = []


def hang_up(signum: int, frame: FrameType | None) -> None:
    # Printed by the loop: a print inside the handler could land inside another print.
    HUPS.append(signum)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--ballast-mib", type=int, default=16)
    parser.add_argument("--print-interval", type=float, default=0.2)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, hang_up)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    token = uuid.uuid4().hex
    marker = b"CHAOSTOKEN:" + token.encode()
    block = hashlib.sha512(marker).digest() * 16  # 1 KiB
    ballast = bytearray(block * (args.ballast_mib * 1024))
    expected = hashlib.sha256(ballast).digest()
    print(f"started token={token}", flush=True)
    listener = bind(args.port, min(args.print_interval, 0.5))
    ticks = 0
    next_tick = time.monotonic() + args.print_interval
    while True:
        ready, _, _ = select.select([listener], [], [], max(next_tick - time.monotonic(), 0.0))
        if ready:
            conn, _ = listener.accept()
            with conn:
                whole = hashlib.sha256(ballast).digest() == expected and marker.endswith(
                    token.encode()
                )
                conn.settimeout(5.0)
                reply = f"token={token} ballast={'ok' if whole else 'BAD'} ticks={ticks}\n"
                with contextlib.suppress(OSError):
                    conn.sendall(reply.encode())
        while HUPS:
            HUPS.pop()
            print(f"hup token={token}", flush=True)
        now = time.monotonic()
        if now >= next_tick:
            ticks += 1
            print(f"tick {ticks} token={token}", flush=True)
            # After a restore the monotonic clock has moved on: no burst of catch-up lines.
            next_tick = now + args.print_interval


if __name__ == "__main__":
    main()
