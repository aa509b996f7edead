#!/usr/bin/env bash
# Upgrade the service installed in $EMBEDDING_HOME (layout: ops/lib.sh), so that it can be killed at any
# moment and still leave a service that serves and a version that starts:
#   ops/upgrade.sh [--no-gap] [--active-minutes N [--force]] [--config FILE] (--source DIR
#                  | --wheel FILE --sha256 HEX | --version X (--find-links DIR | --index-url URL) --sha256 HEX)
#
# Where the new version comes from is always named here: a source tree, a wheel, or a version from a wheel
# directory or an index given on this command line. pip runs isolated (no pip.conf, no PIP_* variables), so no
# configured index can supply the service: a same-named package elsewhere is never installed. A wheel, given or
# downloaded, is installed only if its SHA-256 is the one given (CI publishes it beside the wheel).
#
#  1. take the lock (a second upgrade, rollback, start or stop refuses, naming the holder) and clean what an
#     interrupted run left: unfinished builds, a switch that was not finished
#  2. only with --active-minutes N: refuse while the service is in use, requests in the last N minutes or texts
#     queued, read from its own GET /activity (exit 3; --force upgrades anyway). Without it the upgrade runs
#     under load: clients see no gap (step 4)
#  3. build the new version beside the running one: a hard-linked copy of the current venv, pip install
#     into the copy, its configuration (--config FILE, or the current one), an import check of the service
#     and its model stack; then one rename makes it a complete version. The running version is never touched.
#  4. switch: current -> the new version (rename of a link); the new version starts beside the running one on
#     the same listening socket, which the running one hands over, and accepts connections once its model is
#     ready; checked through a socket of its own (/ready, one real embedding), it serves, and only then does the
#     old one stop accepting and answer what it accepted. No connection is refused. If the new one does not
#     serve, it is stopped and current -> the previous version, which never stopped. Where a handover is not
#     possible (no memory for a second process, a running service or a version from before handovers, another
#     port) it stops, then starts, with a warning: --no-gap refuses instead (exit 3, nothing changed). This
#     step runs in its own session: killing the upgrade does not stop it halfway.
# Exit codes: 0 upgraded; 1 failed, the previous version serves (never switched, or switched back);
# 2 usage; 3 refused (active, or no handover without a gap under --no-gap); 4 nothing serves; 5 another ops
# command is running.
# Environment: EMBEDDING_HOME (the install, default /opt/embedding-service); LOCK_WAIT_S (seconds to wait
# for another ops command's lock, default 0: refuse); STOP_TIMEOUT_S (SIGKILL after, default 150);
# READY_TIMEOUT_S (wait for /ready; default: the version's EMBEDDING_STARTUP_TIMEOUT_S, 600 unless set, plus
# READY_MARGIN_S, 60); KEEP_VERSIONS (versions kept, the current one included, default 5); EMBEDDING_PIP_ARGS
# (pip options, e.g. --no-deps for code only); HANDOVER_RESERVE_BYTES (memory a handover leaves free for the
# rest of the host, default 0); NO_GAP=1 (as --no-gap).
set -euo pipefail
OPS_NAME=upgrade
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"
command_line="$(basename "$0") $*"

# What the new version must import before it can become current: the service and its model stack.
IMPORT_CHECK="import app, app.api, app.backend, app.engine, app.front, app.memory, app.server, gunicorn, torch, sentence_transformers"

force=0 minutes="" source_dir="" version="" config="" wheel="" sha256="" find_links="" index_url=""
usage() {
    echo "usage: $0 [--no-gap] [--active-minutes N [--force]] [--config FILE] (--source DIR | --wheel FILE --sha256 HEX" \
        "| --version X (--find-links DIR | --index-url URL) --sha256 HEX); --help for more" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --no-gap) NO_GAP=1 ;;
        --active-minutes) minutes="${2:?}"; shift ;;
        --source) source_dir="$(readlink -f "${2:?}")"; shift ;;
        --version) version="${2:?}"; shift ;;
        --wheel) wheel="$(readlink -f "${2:?}")"; shift ;;
        --sha256) sha256="${2:?}"; shift ;;
        --find-links) find_links="$(readlink -f "${2:?}")"; shift ;;
        --index-url) index_url="${2:?}"; shift ;;
        --config) config="$(readlink -f "${2:?}")"; shift ;;
        -h | --help) help_text; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
    shift
done
[ $(( (${#source_dir} > 0) + (${#wheel} > 0) + (${#version} > 0) )) = 1 ] || usage  # exactly one origin
[ -z "$version" ] || [ $(( (${#find_links} > 0) + (${#index_url} > 0) )) = 1 ] \
    || die "--version needs where to take it from: --find-links DIR or --index-url URL (never a configured index)" 2
[ -z "$source_dir" ] || [ -z "$sha256$find_links$index_url" ] || usage
[ -n "$source_dir" ] || [[ "$sha256" =~ ^[0-9a-f]{64}$ ]] || die "a wheel needs --sha256 HEX, its 64 hex digits" 2
[ -z "$source_dir" ] || [ -f "$source_dir/pyproject.toml" ] || die "no pyproject.toml in $source_dir" 2
[ -z "$wheel" ] || [ -f "$wheel" ] || die "no wheel file $wheel" 2
[ -z "$find_links" ] || [ -d "$find_links" ] || die "no directory $find_links" 2
[ -z "$config" ] || [ -f "$config" ] || die "no configuration file $config" 2

check_activity() {
    if [ -z "$minutes" ]; then
        is_running && log "not checking for activity (--active-minutes N does): clients see no gap"
        return 0
    fi
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
            log "--force: upgrading while active"
        else
            die "the service is in use ($requests requests in the last $minutes minutes, $queued texts queued): not upgrading while indexing runs. Retry when it is idle, or pass --force" 3
        fi
    fi
}

# Called as `build || fail_build ...`, where bash ignores `set -e`: every step returns on failure.
# Sets NEW_NAME to the complete version it built.
build() {
    local base="$1" new_version
    log "copying the running version's environment as the base of the new one (hard links)"
    copy_version "$base" || { log "the copy failed"; return 1; }
    local pip=("$BUILDING/venv/bin/python" -m pip install --upgrade --disable-pip-version-check)
    # shellcheck disable=SC2206  # EMBEDDING_PIP_ARGS is a list of options
    pip+=(${EMBEDDING_PIP_ARGS:-})
    if "$BUILDING/venv/bin/python" -I -m pip show -q "$OLD_DISTRIBUTION" >/dev/null 2>&1; then
        # A version from before the service's own distribution name: both would own app/; the copy drops the old
        # one first (hard links: the running version keeps its files).
        "$BUILDING/venv/bin/python" -I -m pip uninstall -y -q "$OLD_DISTRIBUTION" >>"$LOG_DIR/ops.log" 2>&1 \
            || { log "cannot remove $OLD_DISTRIBUTION from the copy"; return 1; }
    fi
    if [ -n "$source_dir" ]; then
        log "installing from $source_dir"
        # From a snapshot without build output: pip builds a local tree in place, and a build killed half-way
        # leaves build/ behind, which fails every later build from that tree ("File exists").
        local tree="$BUILDING/source"
        mkdir -p "$tree" || { log "cannot create $tree"; return 1; }
        tar -C "$source_dir" -cf - --exclude=./build --exclude='./.venv*' --exclude=./.git --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude=./reports --exclude='./.*_cache' . | tar -C "$tree" -xf - \
            || { log "cannot copy the source $source_dir"; return 1; }
        "${pip[@]}" -c "$tree/constraints.txt" "$tree" >>"$LOG_DIR/ops.log" 2>&1 \
            || { log "pip failed (its output is in $LOG_DIR/ops.log)"; return 1; }
        rm -rf "$tree"
    else
        # Only from where this command line says: isolated from pip.conf and PIP_* (a configured index could hold
        # a same-named package), the wheel's hash checked before pip sees it.
        local from=(--no-index) file="$wheel"
        [ -z "$find_links" ] || from=(--no-index --find-links "$find_links")
        [ -z "$index_url" ] || from=(--index-url "$index_url")
        if [ -n "$version" ]; then
            log "downloading $DISTRIBUTION==$version from ${find_links:-$index_url}"
            mkdir -p "$BUILDING/wheel" || return 1
            "$BUILDING/venv/bin/python" -m pip download --isolated --disable-pip-version-check --no-deps \
                --only-binary=:all: "${from[@]}" -d "$BUILDING/wheel" "$DISTRIBUTION==$version" >>"$LOG_DIR/ops.log" 2>&1 \
                || { log "cannot download $DISTRIBUTION==$version from ${find_links:-$index_url} (see $LOG_DIR/ops.log)"; return 1; }
            file=$(find "$BUILDING/wheel" -name '*.whl' | head -n 1)
        fi
        local found
        found=$(sha256sum "$file" | cut -d' ' -f1)
        if [ "$found" != "$sha256" ]; then
            log "$(basename "$file") has SHA-256 $found, not the $sha256 given: not installing it"
            return 1
        fi
        log "installing $(basename "$file") (SHA-256 verified)"
        "${pip[@]}" --isolated "${from[@]}" "$file" >>"$LOG_DIR/ops.log" 2>&1 \
            || { log "pip failed (its output is in $LOG_DIR/ops.log)"; return 1; }
        rm -rf "$BUILDING/wheel"
    fi
    if [ -n "$config" ]; then
        cp "$config" "$BUILDING/service.env" || { log "cannot copy the configuration $config"; return 1; }
        log "the new version gets the configuration $config"
    fi
    log "checking that the new version imports"
    "$BUILDING/venv/bin/python" -I -c "$IMPORT_CHECK" >>"$LOG_DIR/ops.log" 2>&1 \
        || { log "the new version does not import (see $LOG_DIR/ops.log)"; return 1; }
    new_version=$(installed_version "$BUILDING")
    [ "$new_version" != unknown ] || { log "the new environment has no $DISTRIBUTION package"; return 1; }
    NEW_NAME="$(date -u +%Y%m%dT%H%M%SZ)-$new_version"
    if [ -n "$source_dir" ]; then  # pip freeze names the snapshot it built: name the source it came from
        sed -i "s|file://$BUILDING/source|file://$source_dir|" \
            "$BUILDING/venv/lib/"python*/site-packages/plateau_embeddings-*.dist-info/direct_url.json 2>/dev/null || true
    fi
    finish_version "$BUILDING" "$NEW_NAME" "$base" "$new_version" || { log "cannot publish $BUILDING as $NEW_NAME"; return 1; }
    log "built version $new_version as versions/$NEW_NAME"
}

take_lock "$command_line"
clean_leftovers
base=$(live_dir) || die "nothing installed in $EMBEDDING_HOME: no current version" 2
previous=$(current_name)
log "upgrade of $EMBEDDING_HOME from version $(installed_version) (versions/$previous) to ${version:-${wheel:-the source in $source_dir}}"
check_activity
if [ "$NO_GAP" = 1 ] && reason=$(gap_reason "$base") && [ -n "$reason" ] && [ "$reason" != "nothing is running" ]; then
    die "--no-gap: not upgrading, the service could not be handed over without a gap: $reason" 3
fi
if ! build "$base"; then
    rm -rf "${BUILDING:?}" || true
    die "upgrade failed while building the new version; nothing was switched, version $(installed_version) is untouched" 1
fi
status=0
switch_and_check "$NEW_NAME" "$previous" || status=$?
case "$status" in
    0)
        log "upgraded from versions/$previous to versions/$NEW_NAME; ops/rollback.sh goes back"
        prune_versions
        ;;
    2) die "upgrade failed: could not switch to versions/$NEW_NAME; versions/$previous still serves, untouched" 1 ;;
    1) die "upgrade failed: versions/$NEW_NAME did not serve; switched back, versions/$previous serves again" 1 ;;
    3) die "--no-gap: versions/$NEW_NAME could not take over without a gap; versions/$previous serves on, current names it again" 3 ;;
    *) die "ROLLBACK FAILED: nothing serves; see $LOG_DIR/service.log and ops/runbooks.md" 4 ;;
esac
