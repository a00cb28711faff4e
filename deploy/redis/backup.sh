#!/bin/sh
# Consistent Redis backup: ask for a snapshot (BGSAVE), wait until it is written, copy the RDB and
# the append-only files with a date, drop copies older than KEEP_DAYS.
set -eu
BACKUP_DIR=${BACKUP_DIR:-/var/backups/drh-pacs}
REDIS_DIR=${REDIS_DIR:-/var/lib/redis}
KEEP_DAYS=${KEEP_DAYS:-14}
CLI="redis-cli ${REDIS_CLI_ARGS:-}"
field() { $CLI INFO persistence | tr -d '\r' | sed -n "s/^$1://p"; }
wait_idle() {
    i=0
    while [ "$(field rdb_bgsave_in_progress)" != "0" ]; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ]; then echo "BGSAVE did not finish in 10 min" >&2; exit 1; fi
        sleep 0.5
    done
}
wait_idle                      # a snapshot already running (a scheduled save) finishes first
reply=$($CLI BGSAVE)
case "$reply" in
    *started*) ;;
    *) echo "BGSAVE refused: $reply" >&2; exit 1 ;;
esac
wait_idle
if [ "$(field rdb_last_bgsave_status)" != "ok" ]; then
    echo "BGSAVE failed (see the Redis log)" >&2
    exit 1
fi
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$BACKUP_DIR"
cp "$REDIS_DIR/dump.rdb" "$BACKUP_DIR/dump-$stamp.rdb"
if [ -d "$REDIS_DIR/appendonlydir" ]; then
    tar -C "$REDIS_DIR" -czf "$BACKUP_DIR/aof-$stamp.tar.gz" appendonlydir
fi
find "$BACKUP_DIR" -name 'dump-*.rdb' -mtime +"$KEEP_DAYS" -delete
find "$BACKUP_DIR" -name 'aof-*.tar.gz' -mtime +"$KEEP_DAYS" -delete
echo "backup $BACKUP_DIR/dump-$stamp.rdb"
