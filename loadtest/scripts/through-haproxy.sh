#!/bin/bash
# Fan-out through HAProxy to three `vantage-sync serve` replicas on one
# PostgreSQL, all on this machine (docs/performance.md, "Through HAProxy").
# Needs root (PostgreSQL runs as the postgres OS user), haproxy, openssl,
# curl, jq and the release builds.
# Usage: loadtest/scripts/through-haproxy.sh [SUBSCRIBERS] [SERVER_BIN]
#
# One process may hold at most 20,000 open files here, and HAProxy takes
# two per proxied connection, so the subscribers are split into shares of
# at most 8,500: each share has its own HAProxy process (its own port, the
# same configuration) and its own load tool, which follows and changes its
# own resource. All the load tools make their first change at the same
# moment, once every subscriber is connected; the script then adds up what
# they counted and takes percentiles over all their delays.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SUBS=${1:-9000}
BIN=${2:-$ROOT/target/release/vantage-sync}
LT=${LOADTEST:-$ROOT/target/release/vantage-sync-loadtest}
CHANGES=${CHANGES:-10}
INTERVAL_MS=${INTERVAL_MS:-2000}
SHARE_MAX=${SHARE_MAX:-8500}
D=/tmp/vantage-sync-through-haproxy
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  sleep 2
  su postgres -c "$PGBIN/pg_ctl -D $D/pg -m fast stop" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf $D; mkdir -p $D; chown postgres $D
su postgres -c "$PGBIN/initdb -D $D/pg -A trust -U postgres" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $D/pg -o '-p 5499 -c listen_addresses=127.0.0.1 -c max_connections=400 -k $D' -l $D/pg.log -w start" >/dev/null
DB=postgres://postgres@127.0.0.1:5499/postgres
SECRET=$(openssl rand -hex 32)
$BIN migrate --database-url $DB up >/dev/null
ulimit -n 20000
for i in 1 2 3; do
  DATABASE_URL=$DB JWT_SECRET=$SECRET RUST_LOG=warn $BIN serve --listen-addr 127.0.0.1:808$i > $D/replica$i.log 2>&1 &
done
SHARES=$(( (SUBS + SHARE_MAX - 1) / SHARE_MAX ))
PER=$(( (SUBS + SHARES - 1) / SHARES ))
for s in $(seq 0 $((SHARES - 1))); do
  # HAProxy refuses to start when maxconn needs more descriptors than the
  # hard limit: 9,500 connections fit under 20,000.
  sed -e 's/^    maxconn 4096/    maxconn 9500/' -e "s/bind 127.0.0.1:8080/bind 127.0.0.1:$((18080 + s))/" \
    $ROOT/docs/haproxy.cfg > $D/haproxy$s.cfg
  grep -q "maxconn 9500" $D/haproxy$s.cfg
  haproxy -f $D/haproxy$s.cfg > $D/haproxy$s.log 2>&1 &
done
for i in $(seq 1 60); do
  up=0; for p in 8081 8082 8083; do curl -sf http://127.0.0.1:$p/readyz >/dev/null && up=$((up+1)); done
  [ $up = 3 ] && break; sleep 0.5
done
sleep 5   # HAProxy's health checks see all three
# Seeds the dashboard rows once, before the load tools run side by side.
$LT fanout --url http://127.0.0.1:18080 --database-url $DB --jwt-secret $SECRET \
  --subscribers 1 --changes 1 --probe-resource fanout_probe_seed --json > /dev/null
# Time to connect every subscriber, with room to spare: ten seconds, and
# one more for every 400 subscribers.
CHANGES_AT=$(( $(date +%s%3N) + 10000 + SUBS * 1000 / 400 ))
echo "$SUBS subscribers: $SHARES HAProxy processes and load tools of $PER; changes at $(date -d @$((CHANGES_AT / 1000)) +%T)"
# Each replica's open subscriptions while the changes are made.
( sleep $(( (CHANGES_AT - $(date +%s%3N)) / 1000 + 1 ))
  for i in 1 2 3; do
    echo "replica$i: $(curl -s http://127.0.0.1:808$i/metrics | grep '^vantage_sync_subscriptions_active ' | cut -d' ' -f2) subscriptions"
  done > $D/replicas.txt ) &
pids=()
for s in $(seq 0 $((SHARES - 1))); do
  $LT fanout --url http://127.0.0.1:$((18080 + s)) --database-url $DB --jwt-secret $SECRET \
    --subscribers $PER --changes $CHANGES --interval-ms $INTERVAL_MS \
    --probe-resource fanout_probe_$s --changes-at $CHANGES_AT \
    --delays-out $D/delays$s.txt --json > $D/tool$s.json 2> $D/tool$s.err &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait $pid || failed=$((failed + 1)); done
for s in $(seq 0 $((SHARES - 1))); do
  jq -c "{share: $s, connected: .fanout.connected, delivered: .fanout.delivered, missed: .fanout.missed, errors: .fanout.errors, p50: .fanout.delay_ms.p50, p99: .fanout.delay_ms.p99, served_by: .fanout.served_by}" $D/tool$s.json 2>/dev/null \
    || { echo "share $s: no report"; cat $D/tool$s.err; }
done
cat $D/replicas.txt
sort -n $D/delays*.txt > $D/delays.txt
n=$(wc -l < $D/delays.txt)
at() { sed -n "$(( (n * $1 + 99) / 100 ))p" $D/delays.txt; }
total() { jq -s "map(.fanout.$1) | add" $D/tool*.json; }
echo "all: connected $(total connected) of $(( PER * SHARES )), delivered $(total delivered) of $(( PER * SHARES * CHANGES )), missed $(total missed), errors $(total errors); delay p50 $(at 50) ms, p99 $(at 99) ms, max $(tail -1 $D/delays.txt) ms"
[ $failed = 0 ] && [ "$(total missed)" = 0 ] && [ "$(total errors)" = 0 ]
