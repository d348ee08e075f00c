#!/usr/bin/env bash
# The seed article's demo with grenadine-sv, run non-interactively and checked:
# set a key in memcached, checkpoint it with `kill -USR1`, list the images, stop
# memcached, restore it from image 0: the key is still there.
# Run from anywhere, as root, after contrib/bootstrap setup. Exits 0 when it worked.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.."

DEMO_CONFIG=examples/memcached/grenadine.toml
DEMO_WORK=/tmp/grenadine-sv-examples/memcached
readonly PORT=21211 MC=examples/memcached/mc
# shellcheck source=examples/demo-lib.sh
source examples/demo-lib.sh

memcached_value() {
    "$MC" get foo | sed -n 2p | grep -v '^END$' || true
}

signal_image_listed() {
    "$GRENADINE_SV" -c "$DEMO_CONFIG" images memcached 2>/dev/null | grep -q ' signal '
}

memcached_refuses() {
    ! "$MC" get foo >/dev/null 2>&1
}

require_free_ports "$PORT"
start_supervisor
wait_running memcached
gsv status

say "set a key"
printf '$ %s set foo grenadine!\n' "$MC"
"$MC" set foo 'grenadine!'
expect "foo" "$(memcached_value)" "grenadine!"

say "checkpoint every program with on_signal = true"
printf '$ kill -USR1 %s\n' "$SUPERVISOR_PID"
kill -USR1 "$SUPERVISOR_PID"
wait_for "a signal image of memcached is listed" signal_image_listed
gsv images

say "stop memcached: its memory is gone"
gsv stop memcached
memcached_refuses || fail "memcached still answers after stop"
echo "ok: nothing listens on $PORT"

say "restore it from image 0"
gsv restore memcached 0
gsv status memcached
printf '$ %s get foo\n' "$MC"
"$MC" get foo
expect "foo after the restore" "$(memcached_value)" "grenadine!"

DEMO_PASSED=true
