"""A dump over CRIU's RPC that answers its notifications, so that work can be done while the
dumped tasks are still frozen (pycriu's `dump()` sends one request and reads one answer).

With `notify_scripts` set, CRIU sends a NOTIFY message at each of its action-script points
("pre-dump", "network-lock", "post-dump", ...) and waits for our answer; at "post-dump" the
image is complete and every task still frozen. Answering with notify_success = false makes
CRIU resume the tasks (or leave them as they were) and fail the dump.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

POST_DUMP = "post-dump"


class PostDumpFailed(Exception):
    """The post-dump work raised: CRIU was told, the dump failed, the tasks were resumed."""


def dump_with_notifications(
    sock: socket.socket, opts: Any, on_post_dump: Callable[[], None]
) -> None:
    """Send a DUMP request with `opts` on `sock` (a `criu swrk` connection) and serve its
    notifications, running `on_post_dump` while the tasks are frozen.

    Raises pycriu.CRIUExceptionExternal when CRIU reports failure, PostDumpFailed (from the
    callback's exception) when the callback failed."""
    import pycriu  # only once something is dumped: the supervisor starts without it

    rpc = pycriu.rpc_pb2
    request = rpc.criu_req()
    request.type = rpc.DUMP
    request.opts.MergeFrom(opts)
    request.opts.notify_scripts = True
    sock.send(request.SerializeToString())
    callback_error: Exception | None = None
    while True:
        response = rpc.criu_resp()
        response.ParseFromString(_receive(sock))
        if response.type != rpc.NOTIFY:
            break
        succeeded = True
        if response.notify.script == POST_DUMP:
            try:
                on_post_dump()
            except Exception as exc:  # told to CRIU, raised below once it has answered
                callback_error = exc
                succeeded = False
        answer = rpc.criu_req()
        answer.type = rpc.NOTIFY
        answer.notify_success = succeeded
        sock.send(answer.SerializeToString())
    if callback_error is not None:
        raise PostDumpFailed(str(callback_error)) from callback_error
    if not response.success:
        raise pycriu.CRIUExceptionExternal(request.type, response.type, response.cr_errno)


def _receive(sock: socket.socket) -> bytes:
    size = len(sock.recv(1, socket.MSG_TRUNC | socket.MSG_PEEK))
    if size == 0:
        raise ConnectionError("criu closed the RPC connection before answering")
    return sock.recv(size)
