#!/usr/bin/env bash
# Upgrade the service installed in $EMBEDDING_HOME, safely:
#   ops/upgrade.sh [--force] [--active-minutes N] (--source DIR | --version X) [--config FILE]
#
#  1. refuse while the service is in use: requests in the last N minutes (default 5) or texts queued,
#     read from its own GET /activity (exit 3; --force upgrades anyway, in-flight requests are still answered)
#  2. back up the current install (venv, service.env, version record) under backups/<UTC time>-<version>
#  3. install the new version (pip, from a source tree or the package index) and, if given, a new service.env
#  4. restart (graceful), wait for /ready, send one real embedding request
#  5. on any failure: restore the backup, restart it, wait for ready, exit 1 (exit 4 if that fails too)
# Exit codes: 0 upgraded, 1 failed and rolled back, 2 usage, 3 refused (active), 4 rollback failed.
# EMBEDDING_PIP_ARGS adds pip options (e.g. --no-deps for a code-only upgrade).
set -euo pipefail
OPS_NAME=upgrade
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"

force=0 minutes=5 source_dir="" version="" config=""
usage() { echo "usage: $0 [--force] [--active-minutes N] (--source DIR | --version X) [--config FILE]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --active-minutes) minutes="${2:?}"; shift ;;
        --source) source_dir="$(readlink -f "${2:?}")"; shift ;;
        --version) version="${2:?}"; shift ;;
        --config) config="$(readlink -f "${2:?}")"; shift ;;
        -h | --help) usage ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
    shift
done
[ -n "$source_dir" ] || [ -n "$version" ] || usage
[ -z "$source_dir" ] || [ -z "$version" ] || usage
[ -z "$source_dir" ] || [ -f "$source_dir/pyproject.toml" ] || die "no pyproject.toml in $source_dir" 2
[ -z "$config" ] || [ -f "$config" ] || die "no configuration file $config" 2

check_activity() {
    if ! is_running; then
        log "service not running: nothing to check for activity"
        return 0
    fi
    local answer requests queued
    answer=$(http GET "/activity?minutes=$minutes")
    [ "${answer%% *}" = 200 ] || die "cannot read the service's activity (${answer:0:200}); use --force to upgrade anyway" 3
    requests=$(json_field requests <<<"${answer#* }")
    queued=$(json_field queue_depth <<<"${answer#* }")
    log "activity: $requests embedding requests in the last $minutes minutes, $queued texts queued"
    if [ "$requests" -gt 0 ] || [ "$queued" -gt 0 ]; then
        if [ "$force" = 1 ]; then
            log "--force: upgrading while active; in-flight requests will still be answered"
        else
            die "the service is in use ($requests requests in the last $minutes minutes, $queued texts queued): not upgrading while indexing runs. Retry when it is idle, or pass --force" 3
        fi
    fi
}

# Called as `install_new || roll_back ...`, where bash ignores `set -e`: every step returns on failure.
install_new() {
    local pip=("$VENV/bin/python" -m pip install --upgrade --disable-pip-version-check)
    # shellcheck disable=SC2206  # EMBEDDING_PIP_ARGS is a list of options
    pip+=(${EMBEDDING_PIP_ARGS:-})
    if [ -n "$source_dir" ]; then
        log "installing from $source_dir"
        "${pip[@]}" -c "$source_dir/constraints.txt" "$source_dir" >>"$LOG_DIR/ops.log" 2>&1 || return 1
    else
        log "installing embedding-service==$version from the package index"
        "${pip[@]}" "embedding-service==$version" >>"$LOG_DIR/ops.log" 2>&1 || return 1
    fi
    if [ -n "$config" ]; then
        cp "$config" "$ENV_FILE" || return 1
        log "installed configuration $config"
    fi
}

roll_back() {  # roll_back BACKUP STEP
    log "upgrade failed at: $2; rolling back to $1"
    if restore_backup "$1" && smoke_test; then
        log "rolled back: version $(installed_version) serves again"
        exit 1
    fi
    die "ROLLBACK FAILED: the service is not serving; see $LOG_DIR/service.log and ops/runbooks.md" 4
}

previous=$(installed_version)
log "upgrade of $EMBEDDING_HOME from version $previous to ${version:-the source in $source_dir}"
check_activity
backup=$(make_backup)
install_new || roll_back "$backup" "install"
log "installed version $(installed_version); restarting"
{ stop_service && start_service; } || roll_back "$backup" "restart"
wait_ready || roll_back "$backup" "readiness (the new version did not become ready)"
smoke_test || roll_back "$backup" "embedding check"
log "upgraded from $previous to $(installed_version); backup $backup kept for ops/rollback.sh"
prune_backups
