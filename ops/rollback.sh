#!/usr/bin/env bash
# Go back to a version that ops/upgrade.sh kept (layout: ops/lib.sh): the same switch as an upgrade's.
#   ops/rollback.sh --list          every version, newest first: its health (good: it served a real
#                                   embedding after a start; failed; unchecked) and which is current/running
#   ops/rollback.sh [--no-gap] [NAME]  switch current to NAME (default: the newest good version older than
#                                   the current one) and hand the running service over to it as an upgrade
#                                   does (no gap; where that is not possible, stop then start, or with
#                                   --no-gap refuse); if NAME does not serve, switch back
# Nothing is copied: every version stays as it was built, and the one left stays listed (a rollback is
# undone by naming it). Exit codes: 0 NAME serves; 1 it did not, the previous one serves again; 2 usage or
# no such version; 3 refused (--no-gap); 4 nothing serves; 5 another ops command is running.
# Environment: EMBEDDING_HOME (the install, default /opt/embedding-service); LOCK_WAIT_S (seconds to wait
# for another ops command's lock, default 0: refuse); STOP_TIMEOUT_S (SIGKILL after, default 150);
# READY_TIMEOUT_S (wait for /ready; default: the version's EMBEDDING_STARTUP_TIMEOUT_S, 600 unless set, plus
# READY_MARGIN_S, 60).
set -euo pipefail
OPS_NAME=rollback
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"
command_line="$(basename "$0") $*"

list() {
    local name running current marks
    current=$(current_name)
    running=$(basename "$(running_dir 2>/dev/null)" 2>/dev/null) || running=""
    list_versions | while read -r name; do
        marks=""
        [ "$name" = "$current" ] && marks+=" current"
        [ "$name" = "$running" ] && is_running && marks+=" running"
        printf '%s\tversion %s\t%s%s\n' "$name" "$(cat "$VERSIONS/$name/VERSION" 2>/dev/null || echo unknown)" \
            "$(health "$name")" "$marks"
    done
}

newest_good_before() {  # newest_good_before NAME: the newest version older than NAME whose health is good
    local name
    list_versions | while read -r name; do
        if [[ "$name" < "$1" ]] && [ "$(health "$name")" = good ]; then
            echo "$name"
            break
        fi
    done
}

if [ "${1:-}" = --no-gap ]; then NO_GAP=1; shift; fi
case "${1:-}" in
    --list | -l) list; exit 0 ;;
    -h | --help) help_text; exit 0 ;;
    -*) echo "usage: $0 [--list | [--no-gap] NAME]; --help for more" >&2; exit 2 ;;
esac

take_lock "$command_line"
clean_leftovers
current=$(current_name)
[ -n "$current" ] || die "nothing installed in $EMBEDDING_HOME: no current version" 2
target="${1:-$(newest_good_before "$current")}"
[ -n "$target" ] || die "no good version older than $current to go back to (see: $0 --list; name one to use it)" 2
[ -d "$VERSIONS/$target/venv" ] || die "no version named $target (see: $0 --list)" 2
[ "$target" != "$current" ] || die "$target is already the current version; ops/service.sh restart restarts it" 2
[ "$(health "$target")" = good ] || log "warning: $target has not been seen serving ($(health "$target")); trying it"
log "rolling back from versions/$current (version $(installed_version)) to versions/$target"
status=0
switch_and_check "$target" "$current" || status=$?
case "$status" in
    0) log "rolled back: versions/$target (version $(installed_version)) serves; versions/$current is kept" ;;
    2) die "could not switch to versions/$target; versions/$current still serves, untouched" 1 ;;
    1) die "versions/$target did not serve; switched back, versions/$current serves again" 1 ;;
    3) die "--no-gap: versions/$target could not take over without a gap; versions/$current serves on" 3 ;;
    *) die "ROLLBACK FAILED: nothing serves; see $LOG_DIR/service.log and ops/runbooks.md" 4 ;;
esac
