#!/usr/bin/env bash
# A Python service's in-memory state survives a restore, not a restart:
# count 3 hits, checkpoint, count 2 more, restart (the count starts over),
# restore the checkpoint (the count goes on from 3, same start time).
# Run from anywhere, as root, after contrib/bootstrap setup. Exits 0 when it worked.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.."

DEMO_CONFIG=examples/python-counter/grenadine.toml
DEMO_WORK=/tmp/grenadine-sv-examples/python-counter
readonly PORT=8712 HIT=examples/python-counter/hit
# shellcheck source=examples/demo-lib.sh
source examples/demo-lib.sh

restored_hit_logged() {
    tail -n 1 "$DEMO_WORK/logs/counter.out.log" | grep -q ' hit 4$'
}

require_free_ports "$PORT"
start_supervisor
wait_running counter
gsv status

say "count three hits"
for _ in 1 2 3; do hit_and_show; done
expect "hits" "$HITS" 3
first_start=$STARTED

say "checkpoint the counter (it keeps serving)"
gsv checkpoint counter

say "two more hits after the checkpoint"
for _ in 1 2; do hit_and_show; done
expect "hits" "$HITS" 5

say "a restart is a cold start: the count begins again"
gsv restart counter
hit_and_show
expect "hits after a restart" "$HITS" 1

say "restore the checkpoint: the count goes on from 3"
gsv images counter
gsv restore counter 0
hit_and_show
expect "hits after the restore" "$HITS" 4
expect "start time after the restore" "$STARTED" "$first_start"

say "its output was captured before and after the restore"
wait_for "the restored counter's 'hit 4' is the last line of its log" restored_hit_logged
gsv logs counter

DEMO_PASSED=true
