"""Which lines of /proc/PID/status say a task is being killed (criu.client.task_condition)."""

from __future__ import annotations

from grenadine_sv.criu.client import _sigkill_pending


def test_a_pending_sigkill_is_read_from_the_thread_or_the_shared_mask() -> None:
    assert _sigkill_pending("SigPnd:\t0000000000000100")
    assert _sigkill_pending("ShdPnd:\t0000000000004100")
    assert not _sigkill_pending("ShdPnd:\t0000000000004000")  # SIGTERM only
    assert not _sigkill_pending("SigBlk:\t0000000000000100")  # blocked is not pending
    assert not _sigkill_pending("Name:\tsleep")
