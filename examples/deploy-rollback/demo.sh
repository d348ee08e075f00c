#!/usr/bin/env bash
# A deploy whose new instance never gets ready is rolled back automatically:
# run release 1 and count some hits, copy release 2 over the configuration and
# reload. Release 2 listens on the wrong port, never gets ready, and the
# supervisor restores release 1 from its pre-deploy image: the service answers
# as before, with the count it had.
# Run from anywhere, as root, after contrib/bootstrap setup. Exits 0 when it worked.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.."

readonly EXAMPLE=examples/deploy-rollback
DEMO_CONFIG=$EXAMPLE/grenadine.toml # generated from release-N.toml, ignored by git
DEMO_WORK=/tmp/grenadine-sv-examples/deploy-rollback
readonly PORT=8713 WRONG_PORT=8714 HIT=examples/python-counter/hit
# shellcheck source=examples/demo-lib.sh
source examples/demo-lib.sh

hit_and_show() {
    local reply
    reply=$("$HIT" "$PORT")
    printf '$ %s %s\n%s\n' "$HIT" "$PORT" "$reply"
    HITS=$(json_field hits <<<"$reply")
}

deploy() {
    printf '$ cp %s/release-%s.toml %s\n' "$EXAMPLE" "$1" "$DEMO_CONFIG"
    cp "$EXAMPLE/release-$1.toml" "$DEMO_CONFIG"
}

demo_cleanup() {
    rm -f "$DEMO_CONFIG"
}

require_free_ports "$PORT" "$WRONG_PORT"
[[ ! -e $DEMO_CONFIG ]] || refuse_if_running # never replace the file a supervisor runs on
deploy 1
start_supervisor
wait_running web
gsv status

say "release 1 serves; count three hits"
for _ in 1 2 3; do hit_and_show; done
expect "hits" "$HITS" 3

say "deploy release 2 (the only difference is the port it listens on)"
printf '$ diff %s/release-1.toml %s/release-2.toml\n' "$EXAMPLE" "$EXAMPLE"
diff "$EXAMPLE/release-1.toml" "$EXAMPLE/release-2.toml" | grep '^[<>] command' || true
deploy 2
code=0
gsv reload >"$DEMO_WORK/reload.out" || code=$?
cat "$DEMO_WORK/reload.out"
expect "reload's exit code (1: the deploy failed)" "$code" 1
grep -q '^changed: web (pre-deploy image [0-9a-f]\{12\})$' "$DEMO_WORK/reload.out" \
    || fail "reload did not report a pre-deploy image of web"
grep -q '^rolled back: web' "$DEMO_WORK/reload.out" || fail "reload did not roll web back"

say "web runs release 1 again, restored from the pre-deploy image: it answers as before"
gsv status web
gsv images web
hit_and_show
expect "hits after the rollback" "$HITS" 4
port_is_free "$WRONG_PORT" || fail "release 2 still listens on $WRONG_PORT"
echo "ok: nothing listens on $WRONG_PORT"

DEMO_PASSED=true
