"""Readiness probes: is a freshly started program ready to serve?"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import trio

from grenadine_sv.config.units import parse_host_port


class ProbeFailed(Exception):
    pass


# Says whether the listener on a port belongs to the instance being probed.
ListenerOwner = Callable[[int], bool]


async def probe_tcp(address: str, owner: ListenerOwner | None = None) -> None:
    host, port = parse_host_port(address)
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ProbeFailed(f"tcp {address}: {exc.strerror or exc}") from exc
    await stream.aclose()
    if owner is not None and not owner(port):
        raise ProbeFailed(
            f"tcp {address}: answered by a process that is not this instance (another copy"
            " or another program holds the port)"
        )


async def probe_command(command: Sequence[str]) -> None:
    try:
        result = await trio.run_process(
            list(command), check=False, capture_stdout=True, capture_stderr=True
        )
    except OSError as exc:
        raise ProbeFailed(f"command {command[0]}: {exc.strerror or exc}") from exc
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        raise ProbeFailed(f"command {command[0]} exited with {result.returncode}{tail}")


async def wait_until_ready(
    *,
    tcp: str | None,
    command: Sequence[str] | None,
    timeout: float,
    interval: float,
    owner: ListenerOwner | None = None,
) -> None:
    """Retry the probe until it passes; raise ProbeFailed with the last reason after `timeout`."""
    last = "no attempt finished"
    deadline = trio.current_time() + timeout
    while True:
        try:
            with trio.fail_after(max(deadline - trio.current_time(), 0.0)):
                if tcp is not None:
                    await probe_tcp(tcp, owner)
                elif command is not None:
                    await probe_command(command)
                return
        except ProbeFailed as exc:
            last = str(exc)
        except trio.TooSlowError:
            pass
        if trio.current_time() + interval >= deadline or math.isclose(timeout, 0.0):
            raise ProbeFailed(f"not ready after {timeout:g}s: {last}")
        await trio.sleep(interval)
