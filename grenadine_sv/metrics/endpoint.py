"""The /metrics endpoint: HTTP/1.1 on trio, parsed and framed by h11.

One request per connection (scrapers open one per scrape). Bounded everywhere a client
could hold the supervisor: the request head's size and the time to send it, the time to
take the reply, and the scrapes rendered at once (each walks the image store).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import h11
import structlog
import trio

from grenadine_sv.metrics.collector import Metrics

log = structlog.get_logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD_BYTES = 8 * 1024
REQUEST_TIMEOUT_SECONDS = 10.0
SEND_TIMEOUT_SECONDS = 30.0
LINGER_SECONDS = 2.0
MAX_DRAIN_BYTES = 1024 * 1024
# Scrapes that arrive together wait for each other rather than walking the disk in parallel.
CONCURRENT_RENDERS = 1

INDEX_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>grenadine-sv</title></head>"
    b'<body><h1>grenadine-sv</h1><p><a href="/metrics">Metrics</a></p></body></html>\n'
)


class MetricsListenError(Exception):
    """The metrics endpoint cannot listen on its address."""


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, message: str, *extra: tuple[str, str]) -> Reply:
    return Reply(status, "text/plain; charset=utf-8", f"{message}\n".encode(), extra)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics on host:port until cancelled. Reports (host, bound port) once it
    listens; raises MetricsListenError before that if it cannot bind."""
    listeners = await _open_listeners(host, port)
    bound_port = int(listeners[0].socket.getsockname()[1])
    log.info("metrics_listening", address=format_address(host, bound_port))
    task_status.started((host, bound_port))
    limiter = trio.CapacityLimiter(CONCURRENT_RENDERS)
    await trio.serve_listeners(partial(_serve_connection, metrics, limiter), listeners)


async def _open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MetricsListenError(
            f"cannot listen on {format_address(host, port)} for metrics: {reason}"
        ) from exc
    if port == 0 and len(listeners) > 1:
        # A name with several addresses would get a different free port on each: keep one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    return listeners


async def _receive_request(connection: h11.Connection, stream: trio.SocketStream) -> h11.Request:
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            # Small reads: h11 bounds a head only while it is incomplete.
            connection.receive_data(await stream.receive_some(4096))
        else:  # the client closed before a whole request head came
            raise h11.RemoteProtocolError("connection closed mid-request", error_status_hint=400)


async def _reply_to(metrics: Metrics, limiter: trio.CapacityLimiter, request: h11.Request) -> Reply:
    if request.method not in (b"GET", b"HEAD"):
        return _text(405, "only GET and HEAD", ("Allow", "GET, HEAD"))
    path = request.target.split(b"?", 1)[0]
    if path == b"/metrics":
        body = await trio.to_thread.run_sync(metrics.render, limiter=limiter)
        return Reply(200, CONTENT_TYPE, body)
    if path == b"/":
        return Reply(200, "text/html; charset=utf-8", INDEX_PAGE)
    return _text(404, "not found; metrics are at /metrics")


async def _serve_connection(
    metrics: Metrics, limiter: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    async with stream:
        with_body = True
        try:
            with trio.fail_after(REQUEST_TIMEOUT_SECONDS):
                request = await _receive_request(connection, stream)
            with_body = request.method != b"HEAD"
            reply = await _reply_to(metrics, limiter, request)
        except h11.RemoteProtocolError as exc:
            reply = _text(exc.error_status_hint, str(exc) or "bad request")
        except trio.TooSlowError:
            reply = _text(408, "request head not received in time")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            # A failing scrape must not take the supervisor down with it.
            log.exception("metrics_render_failed")
            reply = _text(500, "rendering the metrics failed")
        with trio.move_on_after(SEND_TIMEOUT_SECONDS):
            try:
                await stream.send_all(_encode(connection, reply, with_body=with_body))
                await _close_gracefully(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


def _encode(connection: h11.Connection, reply: Reply, *, with_body: bool) -> bytes:
    """The whole response (without its body when it answers HEAD)."""
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Connection", "close"),
        *reply.extra_headers,
    ]
    reason = HTTPStatus(reply.status).phrase
    chunks = [
        connection.send(h11.Response(status_code=reply.status, headers=headers, reason=reason))
    ]
    if with_body:
        chunks.append(connection.send(h11.Data(data=reply.body)))
    chunks.append(connection.send(h11.EndOfMessage()))
    return b"".join(chunk or b"" for chunk in chunks)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Half-close, then read what the client still sends until it closes too. Closing with
    unread data makes the kernel send a reset, which can destroy the reply in flight (an
    oversized request is answered before it is read to its end)."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained <= MAX_DRAIN_BYTES and (chunk := await stream.receive_some(65536)):
            drained += len(chunk)
