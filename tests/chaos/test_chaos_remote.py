"""A short chaos run in remote mode in CI: every image uploaded to a real SeaweedFS, programs
restored from it (`restore NAME remote:REF`), the supervisor SIGKILLed inside uploads and
inside the download and import of remote restores, and the remote invariants of
tests/chaos/remote_mode.py checked on top of the harness's own (no object listed that fails to
verify, no image waiting for upload deleted, interrupted uploads completed by the next
supervisor, every image uploaded in the end). `python -m tests.chaos --remote` runs longer.
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import Options, checked_run

pytestmark = [pytest.mark.root, pytest.mark.criu]

FIRST_SEED = 1
EPISODES = 1


def test_short_remote_chaos_run_keeps_every_invariant() -> None:
    # Remote mode adds `remote-restore` (twice as likely as the others) and the kill targets
    # "upload" and "remote-restore"; no other target, so that kills land in those.
    options = Options(
        iterations=10,
        programs=2,
        operations=("start", "stop", "checkpoint", "checkpoint-stop"),
        kill_targets=(),
        kill_share=0.8,
        recovery_bound=45.0,
        remote=True,
    )
    tally, report = checked_run(FIRST_SEED, options, EPISODES)
    assert tally.operations["remote-restore"] >= 1, report
    # The kills really landed where they were aimed.
    assert tally.kills["upload"] >= 1, report
    assert tally.kills["remote-restore"] >= 1, report
    assert tally.checks["remote object verifies"] > 0, report
    assert tally.checks["every image uploaded"] > 0, report
