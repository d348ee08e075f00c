"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.supervisor_processes import Processes


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Supervisors the test runs as processes; on leaving, all they left is ended by pid."""
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.end_all()
