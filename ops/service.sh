#!/usr/bin/env bash
# Run the embedding service installed in $EMBEDDING_HOME (see ops/lib.sh for the layout).
#   ops/service.sh start | stop | restart | status
# stop: SIGTERM, the service answers what it already received, SIGKILL after $STOP_TIMEOUT_S.
# status: exit 0 running and ready, 1 running but not ready, 3 not running.
set -euo pipefail
OPS_NAME=service
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"

status() {
    if ! is_running; then
        echo "stopped (installed version $(installed_version))"
        return 3
    fi
    local info ready
    info=$(http GET /info | cut -d' ' -f2-)
    ready=$(http GET /ready | cut -d' ' -f1)
    echo "running: pid $(cat "$PID_FILE"), version $(json_field version <<<"${info:-{\}}"), model $(json_field model <<<"${info:-{\}}"), $([ "$ready" = 200 ] && echo ready || echo "not ready")"
    [ "$ready" = 200 ]
}

case "${1:-}" in
    start) start_service && wait_ready ;;
    stop) stop_service ;;
    restart) stop_service && start_service && wait_ready ;;
    status) status ;;
    *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
