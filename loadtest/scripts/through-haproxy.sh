#!/bin/bash
# Fan-out through HAProxy to three `vantage-sync serve` replicas on one
# PostgreSQL, all on this machine (docs/performance.md, "Through HAProxy").
# Needs root (PostgreSQL runs as the postgres OS user), haproxy, openssl,
# curl and the release builds.
# Usage: loadtest/scripts/through-haproxy.sh [SUBSCRIBERS] [SERVER_BIN]
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SUBS=${1:-9000}
BIN=${2:-$ROOT/target/release/vantage-sync}
LT=${LOADTEST:-$ROOT/target/release/vantage-sync-loadtest}
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
# Two descriptors per proxied connection: 9,500 connections fit under a
# hard limit of 20,000.
for i in 1 2 3; do
  DATABASE_URL=$DB JWT_SECRET=$SECRET RUST_LOG=warn $BIN serve --listen-addr 127.0.0.1:808$i > $D/replica$i.log 2>&1 &
done
sed -e 's/^    maxconn 4096/    maxconn 9500/' -e 's/bind 127.0.0.1:8080/bind 127.0.0.1:18080/' $ROOT/docs/haproxy.cfg > $D/haproxy.cfg
grep -q "maxconn 9500" $D/haproxy.cfg
haproxy -f $D/haproxy.cfg > $D/haproxy.log 2>&1 &
for i in $(seq 1 60); do
  up=0; for p in 8081 8082 8083; do curl -sf http://127.0.0.1:$p/readyz >/dev/null && up=$((up+1)); done
  [ $up = 3 ] && break; sleep 0.5
done
sleep 5   # HAProxy's health checks see all three
$LT fanout --url http://127.0.0.1:18080 --database-url $DB --jwt-secret $SECRET --subscribers $SUBS
