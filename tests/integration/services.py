"""Small services written for the daemon tests: each keeps state a restore must bring back."""

from __future__ import annotations

import json
import socket

from tests.integration.supervising import python_program


def sqlite_counter(database: str, port: int) -> str:
    """A TOML command array: an HTTP-less TCP service over an open sqlite database in WAL mode.

    Each connection that asks (sends a line) inserts a row and is answered with the row count
    and the number of requests this process has served (its state in memory); a connection
    that asks nothing (a readiness probe) is closed. SIGTERM closes the database
    cleanly (sqlite then merges the WAL into the database file) and exits 0."""
    return python_program(
        "import signal, socket, sqlite3, sys\n"
        f"db = sqlite3.connect({database!r}, isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL')\n"
        "db.execute('CREATE TABLE IF NOT EXISTS hits (n INTEGER)')\n"
        "def stop(*_):\n"
        "    db.close(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "server = socket.create_server(('127.0.0.1', " + str(port) + "))\n"
        "served = 0\n"
        "while True:\n"
        "    conn, _ = server.accept()\n"
        "    if not conn.recv(64):\n"
        "        conn.close(); continue\n"
        "    served += 1\n"
        "    db.execute('INSERT INTO hits VALUES (?)', (served,))\n"
        "    rows = db.execute('SELECT count(*) FROM hits').fetchone()[0]\n"
        "    conn.sendall(f'{rows} {served}\\n'.encode()); conn.close()\n"
    )


def ask(port: int) -> tuple[int, int]:
    """One connection to sqlite_counter: (rows in the database, connections served)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"hit\n")
        reply = conn.makefile().readline().split()
    return int(reply[0]), int(reply[1])


def pong_client(port: int) -> str:
    """A TOML command array: a client that keeps one TCP connection to 127.0.0.1:`port` and
    answers each "ping" line with "pong N", N counting up in its memory."""
    return python_program(
        "import socket\n"
        f"conn = socket.create_connection(('127.0.0.1', {port}))\n"
        "lines = conn.makefile('rb')\n"
        "n = 0\n"
        "for line in lines:\n"
        "    n += 1\n"
        "    conn.sendall(f'pong {n}\\n'.encode())\n"
    )


def ping(peer: socket.socket) -> int:
    """Send "ping" on `peer` and return the N of the "pong N" it is answered with."""
    peer.sendall(b"ping\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = peer.recv(64)
        if not chunk:
            raise ConnectionError("the client closed the connection")
        reply += chunk
    word, number = reply.split()
    assert word == b"pong", reply
    return int(number)


def toml_list(words: list[str]) -> str:
    return json.dumps(words)
