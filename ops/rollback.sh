#!/usr/bin/env bash
# Restore a backup that ops/upgrade.sh made, restart it and wait until it is ready.
#   ops/rollback.sh --list          list backups, newest first
#   ops/rollback.sh [BACKUP]        restore BACKUP (default: the newest)
# The install being replaced is backed up first, so a rollback can be undone. Keeps the newest
# $KEEP_BACKUPS backups (default 5). Exit codes: 0 restored and ready, 1 failed, 2 usage or no such backup.
set -euo pipefail
OPS_NAME=rollback
# shellcheck source=ops/lib.sh  # OPS_NAME above names this script in its log lines
. "$(dirname "$(readlink -f "$0")")/lib.sh"

case "${1:-}" in
    --list | -l)
        list_backups | while read -r name; do
            printf '%s\tversion %s\n' "$name" "$(cat "$BACKUP_DIR/$name/VERSION")"
        done
        exit 0
        ;;
    -h | --help) echo "usage: $0 [--list | BACKUP]" >&2; exit 2 ;;
esac

target="${1:-$(list_backups | head -n 1)}"
[ -n "$target" ] || die "no backups in $BACKUP_DIR" 2
[ -d "$BACKUP_DIR/$target/venv" ] || die "no backup named $target (see: $0 --list)" 2
log "rolling back from version $(installed_version) to $target"
make_backup >/dev/null
restore_backup "$target" || die "the restored version did not become ready; see $LOG_DIR/service.log"
smoke_test || die "the restored version does not embed; see $LOG_DIR/service.log"
log "rolled back: version $(installed_version) is ready"
prune_backups
