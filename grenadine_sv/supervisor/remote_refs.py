"""How a restore names an image in the object store, and the error when none can be had.

Apart from `remote` (the object store itself, loaded only when [supervisor.remote] url is
set), so that naming such an image costs a supervisor without one nothing."""

from __future__ import annotations

REMOTE_PREFIX = "remote:"


class RemoteUnavailable(Exception):
    """An image could not be had from the object store; the message says why."""
