#!/usr/bin/env bash
# Run the embedding service installed in $EMBEDDING_HOME (see ops/lib.sh for the layout).
#   ops/service.sh start | stop | restart [--no-gap] | status
# start: the current version, then wait for /ready and one real embedding (which marks the version good).
# stop: SIGTERM, the service answers what it already received, SIGKILL after $STOP_TIMEOUT_S.
# restart: a new process of the current version takes over the running one's socket once its model is ready,
# then the old one stops accepting and answers what it accepted: no client is refused. Where that is not
# possible (no memory for a second process, a service started otherwise) it stops, then starts, with a
# warning; --no-gap refuses instead (exit 3).
# start, stop and restart take the ops lock (exit 5 while an upgrade or rollback runs) and finish what an
# interrupted upgrade left. status: exit 0 running and ready, 1 running but not ready, 3 not running.
# Other exit codes: 1 start failed, 2 usage, 3 refused (--no-gap), 5 another ops command is running.
# Environment: EMBEDDING_HOME (the install, default /opt/embedding-service); LOCK_WAIT_S (seconds to wait
# for another ops command's lock, default 0: refuse); STOP_TIMEOUT_S (SIGKILL after, default 150);
# READY_TIMEOUT_S (wait for /ready; default: the version's EMBEDDING_STARTUP_TIMEOUT_S, 600 unless set, plus
# READY_MARGIN_S, 60); HANDOVER_RESERVE_BYTES (memory a restart leaves free for the rest of the host, default 0).
set -euo pipefail
OPS_NAME=service
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"

status() {
    local current running
    current=$(current_name)
    if ! is_running; then
        echo "stopped (installed version $(installed_version)${current:+, current versions/$current})"
        return 3
    fi
    local info ready
    info=$(http GET /info | cut -d' ' -f2-)
    ready=$(http GET /ready | cut -d' ' -f1)
    running=$(basename "$(running_dir)")
    # /info answers 503 until the model is loaded: then the version is the installed one and the model not known yet.
    local version model
    version=$(json_field version <<<"${info:-{\}}")
    model=$(json_field model <<<"${info:-{\}}")
    echo "running: pid $(cat "$PID_FILE"), version ${version:-$(installed_version)}, model ${model:-(loading)}, $([ "$ready" = 200 ] && echo ready || echo "not ready")"
    if [ -n "$current" ] && [ "$running" != "$current" ]; then
        echo "restart pending: running versions/$running, current is versions/$current"
    fi
    [ "$ready" = 200 ]
}

start() {
    start_service || return 1
    wait_ready || return 1
    checked
}

checked() {  # one real embedding, which marks the running version good
    local name
    smoke_test || return 1
    name=$(current_name)
    if [ "$(running_dir)" = "$VERSIONS/$name" ]; then set_health "$name" good; fi
}

restart() {
    local dir status=0
    [ "${1:-}" != --no-gap ] || NO_GAP=1
    dir=$(live_dir) || { log "nothing installed in $EMBEDDING_HOME (no current, no venv)"; return 1; }
    restart_running "$dir" || status=$?
    [ "$status" = 0 ] || return "$status"
    checked
}

case "${1:-}" in
    start | stop | restart) take_lock "service.sh $1"; clean_leftovers ;;
esac
case "${1:-}" in
    start) start ;;
    stop) stop_service ;;
    restart) restart "${2:-}" ;;
    status) status ;;
    -h | --help) help_text ;;
    *) echo "usage: $0 start|stop|restart|status; --help for more" >&2; exit 2 ;;
esac
