"""The stdio keeper process: holds the read end of every supervised program's stdout/stderr pipe.

Run as ``python -I -S holder.py FD [IDLE_SECONDS]`` where FD is a listening unix socket
(SOCK_SEQPACKET).
Standard library only: it runs without site-packages. It never reads the pipes: while a
supervisor runs, the supervisor drains them through its own copy of each read end; when the
supervisor is killed, this process keeps the pipes open, so a program's writes neither fail
(EPIPE) nor kill it (SIGPIPE): its output waits in the pipe until the next supervisor takes
the read ends back from here and drains them into the log files.

One request per message (JSON), one reply per request; fds travel with SCM_RIGHTS:
  {"op": "keep", "key": K} + fd   hold a copy of fd under K
  {"op": "take", "key": K}        reply carries a copy of the fd held under K
  {"op": "drop", "key": K}        close and forget K
  {"op": "list"}                  {"keys": [...]}
  {"op": "quit"}                  close everything and exit
A single supervisor talks to it at a time (the state_dir lock ensures there is only one).

It exits on its own once no supervisor has been connected for IDLE_SECONDS while every pipe it
holds is hung up (no program can write to it any more): a supervisor killed for good, whose
programs are gone too, leaves nothing for it to keep.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import sys
import time

MAX_MESSAGE = 65536
PROCESS_NAME = b"grenadine-keep"
DEFAULT_IDLE_SECONDS = 600.0
# Once idle that long, how often it looks again whether a program still holds a pipe.
RECHECK_SECONDS = 5.0


def receive(conn: socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _address = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        return None, list(fds)
    try:
        request = json.loads(data)
    except ValueError:
        request = {}
    return (request if isinstance(request, dict) else {}), list(fds)


def reply(conn: socket.socket, answer: dict[str, object], fd: int | None = None) -> None:
    message = json.dumps(answer).encode()
    if fd is None:
        conn.sendmsg([message])
    else:
        conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def same_user(conn: socket.socket) -> bool:
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", credentials)[1]
    return uid == os.geteuid()


def serve(conn: socket.socket, held: dict[str, int]) -> bool:
    """Answer one supervisor until it goes away; False once it asked this process to quit."""
    while True:
        try:
            request, fds = receive(conn)
        except OSError:
            return True
        if request is None:
            for fd in fds:
                os.close(fd)
            return True
        op, key = request.get("op"), request.get("key")
        try:
            if op == "keep" and isinstance(key, str) and len(fds) == 1:
                if key in held:
                    os.close(held.pop(key))
                held[key] = fds.pop()
                reply(conn, {"ok": True})
            elif op == "take" and isinstance(key, str) and key in held:
                reply(conn, {"ok": True}, held[key])
            elif op == "drop" and isinstance(key, str):
                if key in held:
                    os.close(held.pop(key))
                reply(conn, {"ok": True})
            elif op == "list":
                reply(conn, {"ok": True, "keys": sorted(held)})
            elif op == "quit":
                reply(conn, {"ok": True})
                return False
            else:
                reply(conn, {"ok": False, "error": f"bad request: {request!r}"})
        except OSError:
            return True
        finally:
            for fd in fds:
                os.close(fd)


def all_hung_up(held: dict[str, int]) -> bool:
    """True when no process holds the write end of any pipe held (also when none is held)."""
    poller = select.poll()
    for fd in held.values():
        poller.register(fd, select.POLLIN)
    hung_up = {fd for fd, events in poller.poll(0) if events & (select.POLLHUP | select.POLLERR)}
    return hung_up == set(held.values())


def wait_for_supervisor(listener: socket.socket, held: dict[str, int], idle: float) -> bool:
    """Wait until a supervisor connects (True), or until `idle` seconds have passed without
    one and everything held is hung up (False)."""
    deadline = time.monotonic() + idle
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        timeout = remaining if remaining > 0 else min(idle, RECHECK_SECONDS)
        if poller.poll(timeout * 1000):
            return True
        if time.monotonic() >= deadline and all_hung_up(held):
            return False


def main(argv: list[str]) -> int:
    # What prctl(PR_SET_NAME) does, without ctypes (~0.7 MiB in this long-lived process).
    with open("/proc/self/comm", "wb") as comm:
        comm.write(PROCESS_NAME)
    listener = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(listener.fileno(), False)
    idle = float(argv[2]) if len(argv) > 2 else DEFAULT_IDLE_SECONDS
    held: dict[str, int] = {}
    while wait_for_supervisor(listener, held, idle):
        conn, _address = listener.accept()
        with conn:
            if same_user(conn) and not serve(conn, held):
                break
    for fd in held.values():
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
