"""A service with a large warm in-memory state: at a cold start it builds an index (about
100 MiB, several seconds of CPU: each entry is a chain of hashes) before it listens. GET /
answers from the index and counts hits.

A restore brings the index back as it was, without building it again.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import signal
import sys
import time

ENTRIES = 400_000
ROUNDS = 20


def entry(i: int) -> str:
    digest = str(i).encode()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


class Warm:
    def __init__(self) -> None:
        self.started = time.time()
        began = time.monotonic()
        self.index = {i: entry(i) for i in range(ENTRIES)}
        self.build_seconds = round(time.monotonic() - began, 2)
        self.hits = 0


class Handler(http.server.BaseHTTPRequestHandler):
    state: Warm

    def do_GET(self) -> None:
        state = self.state
        state.hits += 1
        body = json.dumps(
            {
                "hits": state.hits,
                "started": state.started,
                "entries": len(state.index),
                "build_seconds": state.build_seconds,
                "sample": state.index[state.hits % ENTRIES][:12],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body + b"\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8715)
    port = parser.parse_args().port
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Handler.state = Warm()
    print(f"index of {ENTRIES} entries built in {Handler.state.build_seconds}s", flush=True)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
