"""A tiny HTTP service whose state lives only in memory: GET / counts hits.

Run under grenadine-sv, checkpoint it, stop it, restore it: the count goes on
where it was, which a cold start would lose.
"""

from __future__ import annotations

import argparse
import http.server
import json
import signal
import sys
import time


class Counter:
    def __init__(self) -> None:
        self.hits = 0
        self.started = time.time()


COUNTER = Counter()


class CounterHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        COUNTER.hits += 1
        body = json.dumps({"hits": COUNTER.hits, "started": COUNTER.started}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"hit {COUNTER.hits}", flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8711)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = http.server.HTTPServer(("127.0.0.1", args.port), CounterHandler)
    print(f"counter listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
