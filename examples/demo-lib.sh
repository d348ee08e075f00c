# shellcheck shell=bash
# Shared by the examples' demo.sh scripts (sourced, not run). Each demo sets:
#   DEMO_CONFIG   its configuration file, relative to the repository root
#   DEMO_WORK     the state_dir/log_dir/control_socket parent its configuration names
# then calls start_supervisor; the supervisor it started is stopped on exit, by its pid.
# A demo may define demo_cleanup, run on exit after the supervisor has stopped.

readonly GRENADINE_SV=.venv/bin/grenadine-sv
readonly WAIT_SECONDS=30

SUPERVISOR_PID=
DEMO_PASSED=false

say() {
    printf '\n==> %s\n' "$*"
}

fail() {
    printf '\ndemo FAILED: %s\n' "$*" >&2
    exit 1
}

# gsv ARGS...: the CLI on this demo's configuration, echoed like a transcript.
gsv() {
    printf '$ grenadine-sv -c %s %s\n' "$DEMO_CONFIG" "$*"
    "$GRENADINE_SV" -c "$DEMO_CONFIG" "$@"
}

# quietly ARGS...: the CLI without the transcript or its output (for polling).
quietly() {
    "$GRENADINE_SV" -c "$DEMO_CONFIG" "$@" >/dev/null 2>&1
}

# wait_for DESCRIPTION COMMAND...: run COMMAND until it succeeds, at most WAIT_SECONDS.
wait_for() {
    local what=$1 deadline=$((SECONDS + WAIT_SECONDS))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || fail "not true after ${WAIT_SECONDS}s: $what"
        sleep 0.1
    done
}

port_is_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

require_free_ports() {
    local port
    for port in "$@"; do
        port_is_free "$port" || fail "port $port is in use: stop what listens there first"
    done
}

program_is_running() {
    "$GRENADINE_SV" -c "$DEMO_CONFIG" status "$1" 2>/dev/null | grep -q " RUNNING "
}

wait_running() {
    wait_for "$1 is RUNNING" program_is_running "$1"
}

supervisor_alive() {
    kill -0 "$SUPERVISOR_PID" 2>/dev/null
}

supervisor_answers() {
    supervisor_alive || fail "the supervisor exited; its log:$(printf '\n'; cat "$DEMO_WORK/supervisor.log")"
    quietly status
}

refuse_if_running() {
    [[ -x $GRENADINE_SV ]] || fail "$GRENADINE_SV is missing: run contrib/bootstrap setup"
    local code=0
    quietly status || code=$?
    ((code == 3)) || fail "a supervisor already answers on $DEMO_CONFIG's socket: stop it first"
}

start_supervisor() {
    refuse_if_running
    trap stop_supervisor EXIT
    rm -rf "$DEMO_WORK" # this demo's own images and logs from an earlier run
    mkdir -p "$DEMO_WORK"
    launch_supervisor
}

# launch_supervisor: start a supervisor on this demo's files as they are (its log appended).
launch_supervisor() {
    say "start the supervisor (its log: $DEMO_WORK/supervisor.log)"
    printf '$ grenadine-sv -c %s &\n' "$DEMO_CONFIG"
    "$GRENADINE_SV" -c "$DEMO_CONFIG" >>"$DEMO_WORK/supervisor.log" 2>&1 &
    SUPERVISOR_PID=$!
    wait_for "the supervisor answers" supervisor_answers
}

# shutdown_supervisor: `grenadine-sv shutdown` (what SIGTERM does), then reap the supervisor.
shutdown_supervisor() {
    gsv shutdown
    wait "$SUPERVISOR_PID" || fail "the supervisor exited with an error"
    SUPERVISOR_PID=
}

# The EXIT trap: SIGTERM (the supervisor stops its programs and exits 0), SIGKILL after a
# bound; then this demo's files go, images included (they hold process memory).
stop_supervisor() {
    local code=$? deadline=$((SECONDS + WAIT_SECONDS)) program_pids=()
    trap - EXIT
    if [[ -n $SUPERVISOR_PID ]] && supervisor_alive; then
        read -r -a program_pids <<<"$(program_pids)"
        kill -TERM "$SUPERVISOR_PID"
        while supervisor_alive && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if supervisor_alive; then
            echo "the supervisor did not stop within ${WAIT_SECONDS}s: killing it and its programs" >&2
            kill -KILL "$SUPERVISOR_PID" "${program_pids[@]}" 2>/dev/null || true
            code=1
        fi
        wait "$SUPERVISOR_PID" || code=1
    fi
    if declare -F demo_cleanup >/dev/null; then
        demo_cleanup || code=1
    fi
    if [[ $DEMO_PASSED == true && $code == 0 ]]; then
        rm -rf "$DEMO_WORK"
        rmdir "$(dirname "$DEMO_WORK")" 2>/dev/null || true # the shared parent, once empty
        printf '\ndemo passed\n'
    else
        printf '\nkept %s for a look (supervisor.log, logs/, state/)\n' "$DEMO_WORK" >&2
        ((code != 0)) || code=1
    fi
    exit "$code"
}

# The pids of the supervisor's running programs (each the PID 1 of its sandbox).
program_pids() {
    "$GRENADINE_SV" -c "$DEMO_CONFIG" status --json 2>/dev/null \
        | .venv/bin/python -c 'import json, sys; print(*(e["pid"] for e in json.load(sys.stdin) if e["pid"]))' \
            2>/dev/null || true
}

# http_get PORT: the body of GET / on 127.0.0.1:PORT, with bash alone.
http_get() {
    local reply
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    reply=$(timeout 5 cat <&3) || true
    exec 3<&-
    printf '%s\n' "${reply##*$'\r\n\r\n'}"
}

# json_field NAME: the value of NAME in the JSON object on stdin.
json_field() {
    .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# hit_and_show: one GET / of the demo's service ($HIT on $PORT), echoed; sets HIT_REPLY (its
# JSON answer), HITS and STARTED from it.
hit_and_show() {
    HIT_REPLY=$("$HIT" "$PORT")
    printf '$ %s\n%s\n' "$HIT" "$HIT_REPLY"
    HITS=$(json_field hits <<<"$HIT_REPLY")
    STARTED=$(json_field started <<<"$HIT_REPLY")
}

# expect WHAT ACTUAL WANTED
expect() {
    if [[ $2 == "$3" ]]; then
        printf 'ok: %s is %s\n' "$1" "$2"
    else
        fail "$1 is '$2', expected '$3'"
    fi
}
