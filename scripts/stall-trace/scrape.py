#!/usr/bin/env python3
# Every 2 s: selected counters of every running command-api's /metrics
import os, time, datetime, urllib.request
WANT = ('souk_store_cache_evict', 'souk_command_conflicts_total', 'souk_http_shed_total', 'souk_commands_overloaded_total')
while True:
    time.sleep(2)
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            if not open(f'/proc/{pid}/comm').read().startswith('command-api'): continue
            env = open(f'/proc/{pid}/environ','rb').read().split(b'\0')
        except OSError: continue
        addr = next((e.split(b'=',1)[1].decode() for e in env if e.startswith(b'COMMAND_API_ADDR=')), None)
        if not addr: continue
        try:
            text = urllib.request.urlopen(f'http://{addr}/metrics', timeout=2).read().decode()
        except Exception as e:
            continue
        vals = [l for l in text.splitlines() if l.startswith(WANT)]
        stamp = datetime.datetime.utcnow().strftime('%H:%M:%S.%f')[:-3]
        print(stamp, pid, ' | '.join(vals), flush=True)
