"""A short chaos run in CI: random operations through the real command line, the supervisor
SIGKILLed inside dumps, inside the sealing of images and at random moments, and the invariants
of issue 11 checked after each new supervisor has taken its programs back.

Every operation and every kill target of the harness runs here since the fixes of issue 11
landed: the programs print a line every 0.2 s (the stdio keeper holds their pipes while no
supervisor exists, case 1), kills land inside `checkpoint --stop` (the tree stays frozen until
its image is listed, case 3), inside restores and inside the next supervisor's take-back (a
cgroup per program keeps one instance, case 2).
`contrib/bootstrap chaos` runs everything, for as long as asked.
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import OPERATIONS, Options, checked_run

pytestmark = [pytest.mark.root, pytest.mark.criu]

FIRST_SEED = 1
EPISODES = 4


def test_short_chaos_run_keeps_every_invariant() -> None:
    # supervisorctl's verbs were left out while they made seeds 1 and 3 stall every take-back
    # restore for ~40 s: CRIU's network lock (nftables) under load, taken now only for
    # images with locked connections.
    options = Options(iterations=10, recovery_bound=30.0, operations=OPERATIONS)
    tally, report = checked_run(FIRST_SEED, options, EPISODES)
    # The kills really landed where they were aimed.
    assert tally.kills["dump"] >= 1, report
    assert tally.kills["sealing"] >= 1, report
    assert tally.kills["restore"] >= 1, report
    assert tally.checks["one supervised instance"] > 0, report
