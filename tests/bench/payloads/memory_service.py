"""A service holding MIB mebibytes of touched memory that answers from a small part of it.

    python memory_service.py PORT MIB

Every page holds its own number. A request `GET /page/N` is answered with the number stored in
page N (one page read); it listens once every page is written. After a restore its first answer
therefore needs only the pages it touches, while an eager restore brings back all of them first.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys

PAGE = 4096


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port, mebibytes = int(sys.argv[1]), int(sys.argv[2])
    pages = (mebibytes << 20) // PAGE
    held = bytearray(b"\x5a") * (pages * PAGE)
    for number in range(pages):
        struct.pack_into("<Q", held, number * PAGE, number)
    server = socket.create_server(("127.0.0.1", port))
    print(f"ready {len(held)}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            request = conn.recv(1024).split()
            try:
                number = int(request[1].rsplit(b"/", 1)[1])
                [stored] = struct.unpack_from("<Q", held, number * PAGE)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n%d" % stored)
            except (IndexError, ValueError, struct.error, OSError):
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")


if __name__ == "__main__":
    main()
