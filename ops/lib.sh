# shellcheck shell=bash
# Shared by ops/service.sh, ops/upgrade.sh and ops/rollback.sh. Needs bash, python3, coreutils, flock and
# setsid (util-linux).
#
# An install lives in one directory, $EMBEDDING_HOME (default /opt/embedding-service):
#   current -> versions/NAME   the version that starts. Replaced only by rename(2) of a new link over it, so
#                              at every instant it names a complete install.
#   versions/NAME/             one version, never modified once built (NAME: <UTC time>-<version>):
#       venv/                  its virtual environment: hard links to every file it shares with the version
#                              it was built from, so an unchanged torch is stored once
#       service.env            its EMBEDDING_* settings (and GUNICORN_CMD_ARGS), one VAR=value a line
#       VERSION, requirements.txt (pip freeze)
#       HEALTH                 "good TIME" once it served a real embedding after a start, "failed TIME: WHY"
#                              when it did not; absent: never checked
#   versions/.building-*/      a version being built; the next command removes one an interrupted run left
#   run/service.pid            the gunicorn master's pid
#   run/handover.PID.sock      where master PID offers its listening socket to the next version (app/handover.py)
#   run/next.pid, run/next.sock  a version started beside the running one during a handover, and the socket
#                              through which it alone is checked; run/draining.pid: the one it replaced, until
#                              it has answered what it accepted. The next command stops what an interrupted
#                              handover left.
#   run/ops.lock               flock(1): one upgrade, rollback, start or stop at a time; says who holds it
#   run/switch                 "TARGET FALLBACK" while a switch is checked; the next command finishes one that
#                              was interrupted
#   logs/service.log           the service's JSON log lines
#   logs/ops.log               every step of start, stop, upgrade and rollback
# An install of the first layout (venv/ and service.env at the top, backups/) is adopted by the next
# upgrade, rollback or start: its venv becomes a version (hard links again), its backups unchecked versions.

EMBEDDING_HOME="$(readlink -m "${EMBEDDING_HOME:-/opt/embedding-service}")"  # one spelling, to compare paths
CURRENT="$EMBEDDING_HOME/current"
VERSIONS="$EMBEDDING_HOME/versions"
RUN_DIR="$EMBEDDING_HOME/run"
PID_FILE="$RUN_DIR/service.pid"
LOCK_FILE="$RUN_DIR/ops.lock"
SWITCH_FILE="$RUN_DIR/switch"
LOG_DIR="$EMBEDDING_HOME/logs"
LEGACY_VENV="$EMBEDDING_HOME/venv"
LEGACY_BACKUPS="$EMBEDDING_HOME/backups"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-150}"   # above the service's graceful timeout (120 s by default)
READY_TIMEOUT_S="${READY_TIMEOUT_S:-}"    # empty: the version's EMBEDDING_STARTUP_TIMEOUT_S + READY_MARGIN_S
READY_MARGIN_S="${READY_MARGIN_S:-60}"    # the interpreter's imports before the service's own start-up clock runs
NEXT_PID_FILE="$RUN_DIR/next.pid"
DRAINING_PID_FILE="$RUN_DIR/draining.pid"
CHECK_SOCKET="$RUN_DIR/next.sock"
export NO_GAP="${NO_GAP:-0}"              # 1: refuse a restart that cannot hand over without a gap
HANDOVER_RESERVE_BYTES="${HANDOVER_RESERVE_BYTES:-0}"  # memory kept free for the host during a handover
KEEP_VERSIONS="${KEEP_VERSIONS:-5}"       # the current one included
LOCK_WAIT_S="${LOCK_WAIT_S:-0}"           # how long to wait for another ops command; 0: refuse at once
OPS_DIR="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
export OPS_NAME="${OPS_NAME:-ops}"

log() {
    mkdir -p "$LOG_DIR"
    printf '%s [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$OPS_NAME" "$*" | tee -a "$LOG_DIR/ops.log" >&2
}

# help_text: the calling script's opening comment (usage, steps, exit codes, environment), for --help.
help_text() {
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

die() {  # die MESSAGE [EXIT_CODE]
    log "ERROR: $1"
    exit "${2:-1}"
}

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# --- one command at a time --------------------------------------------------------------------------------

# take_lock WHAT: hold run/ops.lock until this process and the children it leaves behind have exited. Waits
# up to LOCK_WAIT_S seconds for another holder, then refuses with exit 5, naming it.
take_lock() {
    mkdir -p "$RUN_DIR" || die "cannot create $RUN_DIR"
    exec 9>>"$LOCK_FILE" || die "cannot open the lock $LOCK_FILE"
    local got=0
    if [ "$LOCK_WAIT_S" = 0 ]; then flock -n 9 && got=1; else flock -w "$LOCK_WAIT_S" 9 && got=1; fi
    if [ "$got" = 0 ]; then
        die "another upgrade, rollback, start or stop is running ($(head -n 1 "$LOCK_FILE" 2>/dev/null || echo "holder unknown")); not starting a second one. Wait for it (LOCK_WAIT_S=SECONDS waits), see $LOG_DIR/ops.log" 5
    fi
    printf 'pid %s: %s (since %s)\n' "$$" "$1" "$(now)" >"$LOCK_FILE"
}

# run_detached FUNCTION ARGS...: run a step of this library in its own session, so that killing this
# command (even its whole process group) cannot stop the step halfway. It inherits the lock, which is
# held until it ends; its log lines follow on stderr. Returns its exit status.
run_detached() {
    local out="$RUN_DIR/detached.log" pid follower status=0
    : >"$out" || { log "cannot write $out"; return 1; }
    # shellcheck disable=SC2016  # expanded by the detached bash: $1 is this library, then the step and its arguments
    setsid bash -c '. "$1" && shift && "$@"' detached "$OPS_DIR/lib.sh" "$@" >>"$out" 2>&1 </dev/null &
    pid=$!
    printf 'pid %s: %s, started by pid %s (%s) (since %s)\n' "$pid" "$*" "$$" "$OPS_NAME" "$(now)" >"$LOCK_FILE"
    tail -n +1 -s 0.2 -f --pid="$pid" "$out" >&2 &
    follower=$!
    wait "$pid" || status=$?
    wait "$follower" || true
    return "$status"
}

# --- versions -----------------------------------------------------------------------------------------

# The directory the service starts from: what current points at, or the top directory of a first-layout
# install. Fails when there is neither.
live_dir() {
    if [ -L "$CURRENT" ]; then
        readlink -e "$CURRENT"
    elif [ -d "$LEGACY_VENV" ]; then
        printf '%s' "$EMBEDDING_HOME"
    else
        return 1
    fi
}

current_name() {  # empty for a first-layout install
    [ -L "$CURRENT" ] && basename "$(readlink "$CURRENT")"
    return 0
}

# The value of one setting from the live version's service.env (or its default).
setting() {  # setting NAME DEFAULT
    setting_of "$(live_dir 2>/dev/null)" "$1" "$2"
}

setting_of() {  # setting_of DIR NAME DEFAULT: a setting from DIR/service.env (or its default)
    local value
    # shellcheck source=/dev/null  # the version's own settings file
    value=$(set -a; [ -f "$1/service.env" ] && . "$1/service.env"; eval "printf '%s' \"\${$2:-}\"")
    printf '%s' "${value:-$3}"
}

# The service's distribution; versions installed before it had a name of its own carry the old one.
DISTRIBUTION=plateau-embeddings
OLD_DISTRIBUTION=embedding-service

installed_version() {  # installed_version [DIR]: the service package's version in DIR/venv (default: the live one)
    local dir="${1:-$(live_dir 2>/dev/null)}"
    "$dir/venv/bin/python" -I - "$DISTRIBUTION" "$OLD_DISTRIBUTION" 2>/dev/null <<'PY' || echo unknown
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(version(name))
        break
    except PackageNotFoundError:
        continue
else:
    raise SystemExit(1)
PY
}

list_versions() {  # complete versions, newest first
    [ -d "$VERSIONS" ] || return 0
    find "$VERSIONS" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%f\n' | sort -r
}

health() {  # health NAME: good, failed or unchecked
    local line
    line=$(head -n 1 "$VERSIONS/$1/HEALTH" 2>/dev/null) || line=""
    case "$line" in good*) echo good ;; failed*) echo failed ;; *) echo unchecked ;; esac
}

set_health() {  # set_health NAME good|failed [WHY]
    [ -n "$1" ] && [ -d "$VERSIONS/$1" ] || return 0
    if ! { printf '%s %s%s\n' "$2" "$(now)" "${3:+: $3}" >"$VERSIONS/$1/HEALTH.new" \
        && mv -f "$VERSIONS/$1/HEALTH.new" "$VERSIONS/$1/HEALTH"; }; then
        log "warning: cannot record the health of $1"
    fi
}

# switch_to NAME: point current at versions/NAME by renaming a new link over it, atomic for every reader.
switch_to() {
    [ -x "$VERSIONS/$1/venv/bin/python" ] || { log "no complete version named $1 in $VERSIONS"; return 1; }
    rm -f "$CURRENT.new"
    if ! { ln -s "versions/$1" "$CURRENT.new" && mv -T "$CURRENT.new" "$CURRENT"; }; then
        log "cannot switch $CURRENT to versions/$1"
        return 1
    fi
    log "current -> versions/$1"
}

# finish_version DIR NAME BASE VERSION: make the built tree DIR the complete version NAME (of VERSION).
# The venv's scripts and activate files still name the venv they were copied from (BASE/venv): they are
# rewritten (sed -i writes a new file, so the version they came from keeps its own), then one rename
# publishes the version.
finish_version() {
    local dir="$1" name="$2" base="$3" version="$4" files
    local venv="$VERSIONS/$name/venv"
    files=$(grep -lF -e "$base/venv" -e "$dir/venv" -r "$dir/venv/bin" 2>/dev/null) || files=""
    if [ -n "$files" ]; then
        # shellcheck disable=SC2086  # one path a line, none with spaces (bin/ of a venv)
        sed -i -e "s|$base/venv|$venv|g" -e "s|$dir/venv|$venv|g" $files || return 1
    fi
    "$dir/venv/bin/python" -I -m pip freeze --all >"$dir/requirements.txt" 2>/dev/null || return 1
    echo "$version" >"$dir/VERSION" || return 1
    mv -T "$dir" "$VERSIONS/$name" || return 1
}

# copy_version FROM_DIR: a new tree .building-* beside the versions, whose venv is a hard-linked copy of
# FROM_DIR's and whose service.env is a copy of FROM_DIR's. Sets BUILDING to its path.
copy_version() {
    BUILDING="$VERSIONS/.building-$(date -u +%Y%m%dT%H%M%SZ)-$$"
    mkdir -p "$BUILDING" || return 1
    cp -al "$1/venv" "$BUILDING/venv" || return 1
    if [ -f "$1/service.env" ]; then cp -p "$1/service.env" "$BUILDING/service.env" || return 1; fi
}

# --- the running service ------------------------------------------------------------------------------

# GET or POST a path of the running service; prints "STATUS BODY". Never fails (status 0: no answer).
# With VIA=SOCKET, through that Unix socket instead of the port (a version started beside the running one).
# X-Ops-Check: the service does not count these requests as activity (app/activity.py). The version's
# EMBEDDING_API_KEY, if it has one, goes in the environment (never on a command line, which any user can read).
http() {  # http METHOD PATH [JSON_BODY]
    API_KEY="$(setting EMBEDDING_API_KEY "")" python3 - "$1" "$2" "${3:-}" "$(setting EMBEDDING_PORT 5000)" "${VIA:-}" <<'PY'
import http.client, os, socket, sys
method, path, body, port, via = sys.argv[1:6]
headers = {"Content-Type": "application/json", "X-Ops-Check": "1"}
if os.environ.get("API_KEY"):
    headers["Authorization"] = "Bearer " + os.environ["API_KEY"]

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        os.chdir(os.path.dirname(via) or ".")  # a Unix socket's address holds 107 bytes; an install can be deeper
        self.sock.connect(os.path.basename(via))

connection = Unix("localhost", timeout=30) if via else http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
try:
    connection.request(method, path, body=body.encode() if body else None, headers=headers)
    response = connection.getresponse()
    print(response.status, response.read().decode())
except (OSError, http.client.HTTPException):
    print(0, "")
PY
}

json_field() {  # json_field FIELD <<< JSON
    python3 -c 'import json, sys; value = json.load(sys.stdin).get(sys.argv[1]); print("" if value is None else value)' "$1"
}

is_running() {
    [ -f "$PID_FILE" ] || return 1
    local pid
    pid=$(cat "$PID_FILE")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q gunicorn "/proc/$pid/cmdline" 2>/dev/null
}

running_dir() {  # the directory of the version the running service started from (its python's venv's parent)
    is_running || return 1
    local python
    python=$(tr '\0' '\n' <"/proc/$(cat "$PID_FILE")/cmdline" | head -n 1)
    dirname "$(dirname "$(dirname "$python")")"
}

# run_version DIR COMMAND...: COMMAND in the background with DIR's settings, from the install's directory, its
# output in logs/service.log, without the ops lock's descriptor; $! is its pid (COMMAND begins with setsid: in a
# session of its own once it runs, so that stopping this command leaves it serving).
run_version() {
    local dir="$1"
    shift
    (
        set -a
        # shellcheck source=/dev/null  # the version's own settings file
        [ -f "$dir/service.env" ] && . "$dir/service.env"
        set +a
        cd "$EMBEDDING_HOME" || exit 1
        exec "$@" >>"$LOG_DIR/service.log" 2>&1 </dev/null 9>&-
    ) &
}

# start_service: start the live version from its real directory (current resolved), so that a later
# switch of current never changes the files of a process that is running.
start_service() {
    if is_running; then
        log "already running (pid $(cat "$PID_FILE"))"
        return 0
    fi
    local dir
    dir=$(live_dir) || { log "nothing installed in $EMBEDDING_HOME (no current, no venv)"; return 1; }
    [ -x "$dir/venv/bin/python" ] || { log "no virtual environment in $dir"; return 1; }
    mkdir -p "$RUN_DIR" "$LOG_DIR" || return 1
    local offer=()  # a version that can hand its socket to the next one offers it (app/handover.py)
    if knows_handover "$dir"; then offer=(env "EMBEDDING_HANDOVER_DIR=$RUN_DIR"); fi
    # The service's command line (it runs gunicorn as `make run` does); a version from before it had one is
    # started with gunicorn directly, so a rollback to it still starts.
    if [ -x "$dir/venv/bin/embedding-service" ]; then
        run_version "$dir" "${offer[@]}" setsid "$dir/venv/bin/python" -m app serve
    else
        run_version "$dir" setsid "$dir/venv/bin/python" -m gunicorn -c python:app.gunicorn_conf app.asgi:app
    fi
    local pid=$!
    echo "$pid" >"$PID_FILE" || return 1
    # Until the subshell has become gunicorn, is_running does not know it: a command right after this one (or
    # one that finishes an interrupted run) would start a second service, which finds the port taken.
    wait_exec "$pid" gunicorn
    log "started version $(installed_version "$dir") from $dir (pid $pid), logs in $LOG_DIR/service.log"
}

wait_exec() {  # wait_exec PID WORD: until PID's command line has WORD (it left this shell), at most 5 s
    local waited=0
    while ! grep -q "$2" "/proc/$1/cmdline" 2>/dev/null && kill -0 "$1" 2>/dev/null && [ "$waited" -lt 100 ]; do
        sleep 0.05
        waited=$((waited + 1))
    done
}

stop_service() {
    if ! is_running; then
        log "not running"
        rm -f "$PID_FILE"
        return 0
    fi
    stop_pid "$(cat "$PID_FILE")"
    rm -f "$PID_FILE"
}

# stop_pid PID: SIGTERM, then wait while the service answers what it accepted; SIGKILL after STOP_TIMEOUT_S.
stop_pid() {
    local pid="$1" waited=0
    kill -0 "$pid" 2>/dev/null || return 0
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
    log "stopped pid $pid"
}

# ready_timeout [DIR]: how long to wait for the version in DIR (default: the live one) to become ready:
# READY_TIMEOUT_S where set, else its EMBEDDING_STARTUP_TIMEOUT_S (default 600, the service's own deadline:
# past it the service exits) plus READY_MARGIN_S. Whole seconds.
ready_timeout() {
    if [ -n "$READY_TIMEOUT_S" ]; then
        printf '%s' "$READY_TIMEOUT_S"
        return
    fi
    local startup
    startup=$(setting_of "${1:-$(live_dir 2>/dev/null)}" EMBEDDING_STARTUP_TIMEOUT_S 600)
    python3 -c 'import math, sys; print(math.ceil(float(sys.argv[1])) + int(sys.argv[2]))' "$startup" "$READY_MARGIN_S" \
        2>/dev/null || printf '%s' $((600 + READY_MARGIN_S))
}

# wait_ready [PID [DIR]]: 0 once /ready answers 200 (from PID alone with VIA=its check socket), 1 if the process
# dies or the version in DIR (default: the live one) does not become ready within ready_timeout.
wait_ready() {
    local pid="${1:-$(cat "$PID_FILE" 2>/dev/null)}" start=$SECONDS timeout
    timeout=$(ready_timeout "${2:-}")
    while [ $((SECONDS - start)) -lt "$timeout" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "the service exited while starting; last log lines:"
            tail -n 5 "$LOG_DIR/service.log" >&2 || true
            return 1
        fi
        [ "$(http GET /ready | cut -d' ' -f1)" = 200 ] && return 0
        sleep 0.5
    done
    log "not ready after ${timeout}s"
    return 1
}

# One real embedding request; 0 when it answers one vector: as an array (text-embeddings-inference's answer), or
# under "embeddings" (the object versions before it answered, so a rollback to one still checks).
smoke_test() {
    local answer
    answer=$(http POST /embed '{"inputs": ["upgrade check: one real embedding"]}')
    [ "${answer%% *}" = 200 ] || { log "embedding request failed: ${answer:0:300}"; return 1; }
    python3 -c '
import json, sys
body = json.loads(sys.argv[1].split(" ", 1)[1])
vectors = body if isinstance(body, list) else body["embeddings"]
assert len(vectors) == 1 and len(vectors[0]) > 0' "$answer" || { log "embedding request answered no vector"; return 1; }
}

# serves_now: the running service answers /ready and embeds; records the health of the version it runs.
serves_now() {
    is_running && [ "$(http GET /ready | cut -d' ' -f1)" = 200 ] && smoke_test
}

# --- handing over without a gap -------------------------------------------------------------------------

knows_handover() {  # knows_handover DIR: the version in DIR offers its socket and waits for its model (app/handover.py)
    [ -n "$(find "$1/venv/lib" -maxdepth 4 -path '*/site-packages/app/handover.py' -print -quit 2>/dev/null)" ]
}

# expected_rss: what a new process of the running version holds once warmed (its budget's baseline), plus a
# fifth for loading. Prints bytes, or nothing when the running service does not say.
expected_rss() {
    http GET /memory | python3 -c '
import json, sys
status, _, body = sys.stdin.read().partition(" ")
try:
    print(int(json.loads(body)["budget"]["baseline_bytes"] * 1.2) if status == "200" else "")
except (ValueError, KeyError, TypeError):
    print("")'
}

# memory_room: bytes free for a second process: the host's MemAvailable, or less where this cgroup is limited
# (memory.max - memory.current, cgroup v2), less HANDOVER_RESERVE_BYTES. Prints "ROOM WHERE".
memory_room() {
    python3 - "$HANDOVER_RESERVE_BYTES" <<'PY'
import sys
from pathlib import Path
reserve = int(sys.argv[1])
meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
room, where = int(meminfo["MemAvailable"].split()[0]) * 1024, "the host's available memory"
try:
    group = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip().lstrip("/")
    limit = (group / "memory.max").read_text().strip()
    if limit != "max":
        under = int(limit) - int((group / "memory.current").read_text())
        if under < room:
            room, where = under, f"room under the cgroup's limit {limit}"
except (OSError, IndexError, ValueError):
    pass
print(room - reserve, where + (f" less HANDOVER_RESERVE_BYTES={reserve}" if reserve else ""))
PY
}

# gap_reason DIR: why DIR cannot take over the running service without a gap (empty: it can).
gap_reason() {
    local dir="$1" pid need room where port new_port
    is_running || { echo "nothing is running"; return 0; }
    pid=$(cat "$PID_FILE")
    [ -S "$RUN_DIR/handover.$pid.sock" ] || { echo "the running service (pid $pid) offers no socket to hand over (started by an older version of these scripts, or outside them)"; return 0; }
    knows_handover "$dir" || { echo "$(basename "$dir") is a version that cannot wait for its model before it accepts"; return 0; }
    port=$(setting_of "$(running_dir)" EMBEDDING_PORT 5000)
    new_port=$(setting_of "$dir" EMBEDDING_PORT 5000)
    [ "$new_port" = "$port" ] || { echo "$(basename "$dir") listens on port $new_port, not $port"; return 0; }
    need=$(expected_rss)
    [ -n "$need" ] || { echo "the running service does not say its warmed baseline (GET /memory)"; return 0; }
    read -r room where < <(memory_room)
    if [ "$room" -lt "$need" ]; then
        echo "no room for a second process: it needs about $((need / 1048576)) MiB (the running version's warmed baseline plus a fifth), and $where leaves $((room / 1048576)) MiB"
    fi
    return 0
}

# hand_over DIR: start DIR beside the running service, on its listening socket, which the running master hands
# over (app/handover.py). The new version accepts connections only once its model is ready; it is checked
# through its own socket (run/next.sock): ready, one real embedding. Then it becomes the service and the old one
# stops accepting and answers what it accepted. If the new one does not serve, it is stopped; the old one
# never stopped serving. Returns 0 on a handover, 1 when the new version failed.
hand_over() {
    local dir="$1" old new why=""
    old=$(cat "$PID_FILE")
    rm -f "$CHECK_SOCKET"
    run_version "$dir" env "EMBEDDING_HANDOVER_DIR=$RUN_DIR" setsid "$dir/venv/bin/python" -m app.handover \
        --from "$RUN_DIR/handover.$old.sock" --check "$CHECK_SOCKET" -- "$dir/venv/bin/python" -m app serve
    new=$!
    echo "$new" >"$NEXT_PID_FILE" || return 1
    wait_exec "$new" app.handover  # in a session of its own from then on: killing this one leaves it running
    log "started version $(installed_version "$dir") from $dir (pid $new) beside pid $old, on its socket: it accepts once its model is ready"
    if ! VIA="$CHECK_SOCKET" wait_ready "$new" "$dir"; then
        why="did not become ready"
    elif ! VIA="$CHECK_SOCKET" smoke_test; then
        why="did not embed"
    fi
    if [ -n "$why" ]; then
        log "the new version $why: stopping it (pid $new); pid $old served throughout"
        stop_pid "$new"
        rm -f "$NEXT_PID_FILE" "$CHECK_SOCKET"
        return 1
    fi
    echo "$old" >"$DRAINING_PID_FILE" && echo "$new" >"$PID_FILE.new" && mv -f "$PID_FILE.new" "$PID_FILE" || return 1
    rm -f "$NEXT_PID_FILE" "$CHECK_SOCKET"
    log "handed over: pid $new serves; pid $old stops accepting and answers what it accepted"
    stop_pid "$old"
    rm -f "$DRAINING_PID_FILE"
}

# restart_running DIR: replace the running service by DIR without a gap where gap_reason finds none; else stop,
# then start, with a warning (or, with NO_GAP=1, refuse: exit 3 and nothing stopped).
restart_running() {
    local dir="$1" reason
    reason=$(gap_reason "$dir")
    if [ -z "$reason" ]; then
        hand_over "$dir"
        return
    fi
    if is_running; then
        if [ "$NO_GAP" = 1 ]; then
            log "refusing to restart with a gap (NO_GAP / --no-gap): $reason"
            return 3
        fi
        log "warning: clients will be refused while the service restarts: $reason"
    fi
    stop_service && start_service && wait_ready
}

# stop_leftovers: a handover that was killed can leave a second service running (the one being started, or the
# one it replaced, still draining): stop it, so that one version serves.
stop_leftovers() {
    local file pid sock
    for file in "$NEXT_PID_FILE" "$DRAINING_PID_FILE"; do
        [ -f "$file" ] || continue
        pid=$(cat "$file")
        if [ -n "$pid" ] && [ "$pid" != "$(cat "$PID_FILE" 2>/dev/null)" ] && kill -0 "$pid" 2>/dev/null; then
            log "an interrupted handover left pid $pid running: stopping it"
            stop_pid "$pid"
        fi
        rm -f "$file"
    done
    rm -f "$CHECK_SOCKET"
    for sock in "$RUN_DIR"/handover.*.sock; do
        [ -S "$sock" ] || continue
        pid=${sock##*/handover.}
        kill -0 "${pid%.sock}" 2>/dev/null || rm -f "$sock"
    done
}

# --- switching versions ---------------------------------------------------------------------------------

# restart_checked TARGET FALLBACK: current already names TARGET. Replace the running service by it (handed over
# without a gap where it can: restart_running), wait until ready, one real embedding; if TARGET does not serve,
# current -> FALLBACK (what ran before, still running after a failed handover; else restarted), check again. Records
# each version's health. Run detached (switch_and_check), so that it always ends in a checked state.
# Exit: 0 TARGET serves, 1 TARGET failed and FALLBACK serves again, 3 refused (NO_GAP) and FALLBACK serves on,
# 4 nothing serves.
restart_checked() {
    local target="$1" fallback="${2:-}" status=0
    restart_current "$target" || status=$?
    if [ "$status" = 0 ]; then
        rm -f "$SWITCH_FILE"
        return 0
    fi
    if [ -n "$fallback" ] && [ "$fallback" != "$target" ]; then
        log "switching back to $fallback"
        if switch_to "$fallback"; then
            # A handover that failed (or was refused) never stopped the running version: it still serves.
            if [ "$(running_dir 2>/dev/null)" = "$VERSIONS/$fallback" ] && serves_now; then
                log "version $fallback served throughout"
                rm -f "$SWITCH_FILE"
                [ "$status" = 3 ] && return 3
                return 1
            fi
            if restart_current "$fallback"; then
                rm -f "$SWITCH_FILE"
                return 1
            fi
        fi
    fi
    rm -f "$SWITCH_FILE"
    log "NOTHING SERVES: neither $target nor ${fallback:-a previous version} became ready; see $LOG_DIR/service.log and ops/runbooks.md"
    return 4
}

# restart_current NAME: current names NAME; replace the running service by it (restart_running: without a gap
# where it can), wait until ready, one real embedding. Records NAME's health, except when refused (NO_GAP).
restart_current() {
    local why="" status=0
    restart_running "$VERSIONS/$1" || status=$?
    if [ "$status" = 3 ]; then
        return 3
    elif [ "$status" != 0 ]; then
        why="did not start or become ready"
    elif ! smoke_test; then
        why="did not embed"
    fi
    if [ -n "$why" ]; then
        log "version $1 $why"
        set_health "$1" failed "$why"
        return 1
    fi
    set_health "$1" good
    log "version $1 serves"
}

# switch_and_check TARGET FALLBACK: record the switch, make TARGET current, then restart and check it
# detached (restart_checked). Exit: as restart_checked's, or 2 when current could not be switched (nothing
# changed).
switch_and_check() {
    printf '%s %s\n' "$1" "${2:-}" >"$SWITCH_FILE" || { log "cannot write $SWITCH_FILE; nothing changed"; return 2; }
    if ! switch_to "$1"; then
        rm -f "$SWITCH_FILE"
        log "nothing changed: current still names versions/${2:-?}, and the service was not restarted"
        return 2
    fi
    run_detached restart_checked "$1" "${2:-}"
}

# --- what an interrupted run leaves ---------------------------------------------------------------------

# clean_leftovers: under the lock, before anything else. Removes unfinished builds and a stray link, adopts
# a first-layout install, removes its venv once nothing runs from it, and finishes an interrupted switch.
clean_leftovers() {
    local leftover target fallback
    mkdir -p "$VERSIONS" || die "cannot create $VERSIONS"
    for leftover in "$VERSIONS"/.building-*; do
        [ -e "$leftover" ] || continue
        rm -rf "$leftover" || die "cannot remove $leftover, left by an interrupted run"
        log "removed $leftover, an unfinished version left by an interrupted run"
    done
    rm -f "$CURRENT.new" "$PID_FILE.new"
    stop_leftovers
    [ -L "$CURRENT" ] || [ ! -d "$LEGACY_VENV" ] || adopt_legacy
    if [ -L "$CURRENT" ] && [ ! -e "$CURRENT" ]; then
        die "$CURRENT points at $(readlink "$CURRENT"), which does not exist: ops/rollback.sh --list, then ops/rollback.sh NAME"
    fi
    if [ -d "$LEGACY_VENV" ] && [ -L "$CURRENT" ] && [ "$(running_dir 2>/dev/null)" != "$EMBEDDING_HOME" ]; then
        rm -rf "$LEGACY_VENV" "$EMBEDDING_HOME/service.env" || die "cannot remove the adopted $LEGACY_VENV"
        log "removed $LEGACY_VENV: adopted as versions/$(current_name), and nothing runs from it"
    fi
    if [ -f "$SWITCH_FILE" ]; then
        read -r target fallback <"$SWITCH_FILE" || true
        if [ "$(current_name)" != "$target" ]; then
            rm -f "$SWITCH_FILE"
            log "an interrupted run had not switched to $target: nothing to finish ($target stays, unchecked)"
        elif [ "$(running_dir 2>/dev/null)" = "$VERSIONS/$target" ] && serves_now; then
            set_health "$target" good
            rm -f "$SWITCH_FILE"
            log "an interrupted switch to $target had finished: it serves"
        else
            log "finishing an interrupted switch to $target (falling back to ${fallback:-nothing})"
            run_detached restart_checked "$target" "$fallback" || [ $? = 1 ] \
                || die "the interrupted switch left nothing serving" 4
        fi
    fi
}

# adopt_legacy: a first-layout install (venv/ and service.env at the top) becomes versions/NAME and current;
# the running service keeps running from venv/, which the next command removes once nothing runs from it.
adopt_legacy() {
    local name version
    log "adopting the install in $LEGACY_VENV as a version (hard links)"
    copy_version "$EMBEDDING_HOME" || die "cannot copy $LEGACY_VENV into $VERSIONS; nothing changed"
    version=$(installed_version "$EMBEDDING_HOME")
    name="$(date -u +%Y%m%dT%H%M%SZ)-$version"
    finish_version "$BUILDING" "$name" "$EMBEDDING_HOME" "$version" || die "cannot make $BUILDING a version; nothing changed"
    if [ "$(running_dir 2>/dev/null)" = "$EMBEDDING_HOME" ] && serves_now; then set_health "$name" good; fi
    switch_to "$name" || die "cannot switch to the adopted version $name"
    if [ -d "$LEGACY_BACKUPS" ]; then
        local backup
        for backup in "$LEGACY_BACKUPS"/*/; do
            backup=$(basename "$backup")
            [ -d "$LEGACY_BACKUPS/$backup/venv" ] && [ ! -e "$VERSIONS/$backup" ] || continue
            mv -T "$LEGACY_BACKUPS/$backup" "$VERSIONS/$backup" && log "kept backup $backup as an unchecked version"
        done
        rm -rf "$LEGACY_BACKUPS"
    fi
}

prune_versions() {  # keep the newest KEEP_VERSIONS versions, and always the current and the running one
    local name kept=0 running
    running=$(basename "$(running_dir 2>/dev/null)" 2>/dev/null) || running=""
    list_versions | while read -r name; do
        if [ "$name" = "$(current_name)" ] || [ "$name" = "$running" ] || [ "$kept" -lt "$KEEP_VERSIONS" ]; then
            kept=$((kept + 1))
            continue
        fi
        rm -rf "${VERSIONS:?}/$name" && log "removed old version $name (keeping the newest $KEEP_VERSIONS)"
    done
}
