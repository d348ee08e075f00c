#!/usr/bin/env bash
# Survive a restart of the supervisor (a `systemctl restart grenadine-sv`, a reboot): a
# service builds a large index in memory before it answers; it counts three hits; the
# supervisor is shut down, checkpointing the service first (checkpoint.on_stop); a new
# supervisor restores it (restore = "latest"): the count goes on from 3 and the index is
# back without being built again, in a fraction of the cold start.
# Run from anywhere, as root, after contrib/bootstrap setup. Exits 0 when it worked.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.."

DEMO_CONFIG=examples/reboot-survival/grenadine.toml
DEMO_WORK=/tmp/grenadine-sv-examples/reboot-survival
readonly PORT=8715 HIT=examples/reboot-survival/hit
# shellcheck source=examples/demo-lib.sh
source examples/demo-lib.sh

since() {
    awk -v from="$1" -v to="$EPOCHREALTIME" 'BEGIN { printf "%.2f", to - from }'
}

shutdown_image_listed() {
    local listed # not piped into grep -q: with pipefail, a reader that stops early fails it
    listed=$("$GRENADINE_SV" -c "$DEMO_CONFIG" images warm --json 2>/dev/null)
    grep -q '"trigger": "shutdown"' <<<"$listed"
}

require_free_ports "$PORT"
began=$EPOCHREALTIME
start_supervisor
wait_running warm
cold=$(since "$began")
gsv status

say "three hits on the warm service"
for _ in 1 2 3; do hit_and_show; done
expect "hits" "$HITS" 3
first_start=$STARTED
build=$(json_field build_seconds <<<"$HIT_REPLY")

say "stop the supervisor: the service is checkpointed first (checkpoint.on_stop)"
shutdown_supervisor
shutdown_image_listed || fail "no image with trigger shutdown"
gsv images warm
port_is_free "$PORT" || fail "the service still listens after the supervisor stopped"

say "start a new supervisor: the service comes back from that image"
began=$EPOCHREALTIME
launch_supervisor
wait_running warm
back=$(since "$began")
status=$(gsv status)
printf '%s\n' "$status"
grep -q 'restored from .* (supervisor-start)' <<<"$status" || fail "status does not say restored from"
hit_and_show
expect "hits after the restart of the supervisor" "$HITS" 4
expect "start time after the restart of the supervisor" "$STARTED" "$first_start"

say "figures"
# The supervisor logs JSON lines when its stderr is not a terminal.
timings=$(.venv/bin/python -c '
import json, sys
events = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
done = {e["event"]: e for e in events if e["event"] in ("checkpoint_done", "restore_done")}
print(done["checkpoint_done"]["duration_seconds"], done["restore_done"]["duration_seconds"])
' "$DEMO_WORK/supervisor.log")
read -r dumped restored <<<"$timings"
printf 'cold start: %ss to RUNNING (index built in %ss)\n' "$cold" "$build"
printf 'after a restart of the supervisor: %ss to RUNNING (restore %ss; checkpoint at shutdown %ss)\n' \
    "$back" "$restored" "$dumped"

DEMO_PASSED=true
