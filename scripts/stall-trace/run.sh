#!/bin/bash
# run.sh OUTDIR bench-args...   (run under flock -x)
S=$1; shift; mkdir -p $S
LOG=/var/log/postgresql/postgresql-15-main.log
before=$(wc -l < $LOG)
psql -h 127.0.0.1 -U postgres -Atc "select now(), * from pg_stat_wal" > $S/wal_before
psql -h 127.0.0.1 -U postgres -Atc "select now(), * from pg_stat_bgwriter" > $S/bgw_before
psql -h 127.0.0.1 -U postgres -Atq -f $(dirname "$0")/pgwait.sql > $S/pgwait.log 2>&1 & P1=$!
python3 -W ignore $(dirname "$0")/procs.py > $S/procs.log 2>&1 & P2=$!
python3 -W ignore $(dirname "$0")/scrape.py > $S/scrape.log 2>&1 & P3=$!
date -u > $S/start
"$@" > $S/stdout 2> $S/stderr
echo "exit $?" >> $S/stdout
date -u > $S/end
kill $P1 $P2 $P3
psql -h 127.0.0.1 -U postgres -Atc "select now(), * from pg_stat_wal" > $S/wal_after
psql -h 127.0.0.1 -U postgres -Atc "select now(), * from pg_stat_bgwriter" > $S/bgw_after
tail -n +$((before+1)) $LOG > $S/pglog
