# shellcheck shell=bash
# Shared by ops/service.sh, ops/upgrade.sh and ops/rollback.sh. Needs bash, python3 and coreutils.
#
# An install lives in one directory, $EMBEDDING_HOME (default /opt/embedding-service):
#   venv/                     the virtual environment the service runs from
#   service.env               its EMBEDDING_* settings (and GUNICORN_CMD_ARGS), one VAR=value a line
#   run/service.pid           the gunicorn master's pid
#   logs/service.log          the service's JSON log lines
#   logs/ops.log              every step of start, stop, upgrade and rollback
#   backups/<UTC time>-<version>/   venv (hard-linked copy), service.env, VERSION, requirements.txt

EMBEDDING_HOME="${EMBEDDING_HOME:-/opt/embedding-service}"
VENV="$EMBEDDING_HOME/venv"
ENV_FILE="$EMBEDDING_HOME/service.env"
PID_FILE="$EMBEDDING_HOME/run/service.pid"
LOG_DIR="$EMBEDDING_HOME/logs"
BACKUP_DIR="$EMBEDDING_HOME/backups"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-150}"   # above the service's graceful timeout (120 s by default)
READY_TIMEOUT_S="${READY_TIMEOUT_S:-300}"
KEEP_BACKUPS="${KEEP_BACKUPS:-5}"

log() {
    mkdir -p "$LOG_DIR"
    printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${OPS_NAME:-ops}" "$*" | tee -a "$LOG_DIR/ops.log" >&2
}

die() {  # die MESSAGE [EXIT_CODE]
    log "ERROR: $1"
    exit "${2:-1}"
}

# The value of one setting from service.env (or its default).
setting() {  # setting NAME DEFAULT
    local value
    # shellcheck source=/dev/null  # the install's own settings file
    value=$(set -a; [ -f "$ENV_FILE" ] && . "$ENV_FILE"; eval "printf '%s' \"\${$1:-}\"")
    printf '%s' "${value:-$2}"
}

service_url() {
    printf 'http://127.0.0.1:%s' "$(setting EMBEDDING_PORT 5000)"
}

# GET or POST a path of the running service; prints "STATUS BODY". Never fails (status 0: no answer).
http() {  # http METHOD PATH [JSON_BODY]
    python3 - "$1" "$(service_url)$2" "${3:-}" <<'PY'
import sys, urllib.error, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
request = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        print(response.status, response.read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
except OSError:
    print(0, "")
PY
}

json_field() {  # json_field FIELD <<< JSON
    python3 -c 'import json, sys; value = json.load(sys.stdin).get(sys.argv[1]); print("" if value is None else value)' "$1"
}

installed_version() {  # the version of the service package in a venv (default: the live one)
    "${1:-$VENV}/bin/python" -I -c 'from importlib.metadata import version; print(version("embedding-service"))' 2>/dev/null \
        || echo unknown
}

is_running() {
    [ -f "$PID_FILE" ] || return 1
    local pid
    pid=$(cat "$PID_FILE")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q gunicorn "/proc/$pid/cmdline" 2>/dev/null
}

start_service() {
    if is_running; then
        log "already running (pid $(cat "$PID_FILE"))"
        return 0
    fi
    [ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV"
    mkdir -p "$EMBEDDING_HOME/run" "$LOG_DIR"
    (
        set -a
        # shellcheck source=/dev/null  # the install's own settings file
        [ -f "$ENV_FILE" ] && . "$ENV_FILE"
        set +a
        cd "$EMBEDDING_HOME" || exit 1
        exec setsid "$VENV/bin/python" -m gunicorn -c python:app.gunicorn_conf app.asgi:app \
            >>"$LOG_DIR/service.log" 2>&1 </dev/null
    ) &
    echo $! >"$PID_FILE"
    log "started version $(installed_version) (pid $!), logs in $LOG_DIR/service.log"
}

stop_service() {
    if ! is_running; then
        log "not running"
        rm -f "$PID_FILE"
        return 0
    fi
    local pid waited=0
    pid=$(cat "$PID_FILE")
    log "stopping pid $pid: SIGTERM, in-flight requests are answered first (up to ${STOP_TIMEOUT_S}s)"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt $((STOP_TIMEOUT_S * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still running after ${STOP_TIMEOUT_S}s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

wait_ready() {  # wait_ready [TIMEOUT_S]: 0 once /ready answers 200, 1 if the process dies or time runs out
    local timeout="${1:-$READY_TIMEOUT_S}" start=$SECONDS
    while [ $((SECONDS - start)) -lt "$timeout" ]; do
        if ! is_running; then
            log "the service exited while starting; last log lines:"
            tail -n 5 "$LOG_DIR/service.log" >&2 || true
            return 1
        fi
        [ "$(http GET /ready | cut -d' ' -f1)" = 200 ] && return 0
        sleep 1
    done
    log "not ready after ${timeout}s"
    return 1
}

# One real embedding request; 0 when it answers one vector.
smoke_test() {
    local answer
    answer=$(http POST /embed '{"inputs": ["upgrade check: one real embedding"]}')
    [ "${answer%% *}" = 200 ] || { log "embedding request failed: ${answer:0:300}"; return 1; }
    python3 -c 'import json, sys; assert len(json.loads(sys.argv[1].split(" ", 1)[1])["embeddings"]) == 1' "$answer"
}

list_backups() {  # newest first
    [ -d "$BACKUP_DIR" ] || return 0
    find "$BACKUP_DIR" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -r
}

make_backup() {  # prints the backup's name
    local version name
    version=$(installed_version)
    name="$(date -u +%Y%m%dT%H%M%SZ)-$version"
    mkdir -p "$BACKUP_DIR/$name"
    cp -al "$VENV" "$BACKUP_DIR/$name/venv"  # hard links: seconds, and no second copy of torch
    [ -f "$ENV_FILE" ] && cp -p "$ENV_FILE" "$BACKUP_DIR/$name/service.env"
    echo "$version" >"$BACKUP_DIR/$name/VERSION"
    "$VENV/bin/python" -I -m pip freeze --all >"$BACKUP_DIR/$name/requirements.txt" 2>/dev/null || true
    log "backed up version $version (code, environment, configuration) as $name"
    echo "$name"
}

# Often called as `restore_backup NAME || ...`, where bash ignores `set -e`: every step returns on failure.
restore_backup() {  # restore_backup NAME: stop, put the backup's venv and configuration back, start, wait for ready
    local dir="$BACKUP_DIR/$1"
    [ -d "$dir/venv" ] || die "no backup named $1 (see: ops/rollback.sh --list)" 2
    log "restoring backup $1 (version $(cat "$dir/VERSION"))"
    stop_service || return 1
    rm -rf "$VENV.restoring"
    cp -al "$dir/venv" "$VENV.restoring" || return 1
    rm -rf "$VENV"
    mv "$VENV.restoring" "$VENV" || return 1
    if [ -f "$dir/service.env" ]; then cp -p "$dir/service.env" "$ENV_FILE" || return 1; fi
    start_service || return 1
    wait_ready
}

prune_backups() {
    local name
    list_backups | tail -n +"$((KEEP_BACKUPS + 1))" | while read -r name; do
        rm -rf "${BACKUP_DIR:?}/$name"
        log "removed old backup $name (keeping the newest $KEEP_BACKUPS)"
    done
}
