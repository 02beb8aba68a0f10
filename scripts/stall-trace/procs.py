#!/usr/bin/env python3
# Samples every 50 ms: CPU (cores, over the interval) of command-api, postgres (all), bench; pg_wal files; iowait
import os, sys, time, datetime
HZ = os.sysconf('SC_CLK_TCK')
def procs():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            st = open(f'/proc/{pid}/stat').read()
        except OSError: continue
        name = st[st.find('(')+1:st.rfind(')')]
        f = st[st.rfind(')')+2:].split()
        t = int(f[11]) + int(f[12])
        key = 'pg' if name == 'postgres' else ('api' if name.startswith('command-api') else ('bench' if name == 'bench' else ('nats' if name=='nats-server' else 'other')))
        out[key] = out.get(key, 0) + t
    return out
def cpu():
    l = open('/proc/stat').readline().split()[1:]
    v = list(map(int, l))
    return sum(v), v[3], v[4]
prev = procs(); pc = cpu(); pt = time.time()
while True:
    time.sleep(0.05)
    now = procs(); c = cpu(); t = time.time()
    dt = t - pt
    parts = []
    for k in ('api','pg','bench','nats','other'):
        d = (now.get(k,0) - prev.get(k,0)) / HZ / dt
        parts.append(f'{k}={d:.2f}')
    tot = c[0]-pc[0]
    idle = (c[1]-pc[1]) / tot if tot else 0
    iow = (c[2]-pc[2]) / tot if tot else 0
    try: wal = len(os.listdir('/var/lib/postgresql/15/main/pg_wal')) - 1
    except OSError: wal = -1
    stamp = datetime.datetime.utcfromtimestamp(t).strftime('%H:%M:%S.%f')[:-3]
    print(stamp, ' '.join(parts), f'idle={idle:.2f} iowait={iow:.2f} wal={wal}', flush=True)
    prev, pc, pt = now, c, t
