#!/usr/bin/env python3
"""correlate.py timeline.csv pgwait.log procs.log [min_ms]
For each 100 ms window (by due time) whose slowest answer >= min_ms, print the wait samples and
process samples from 400 ms before it to 100 ms after it."""
import sys, datetime, collections
tl, pw, pr = sys.argv[1:4]
min_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 150
def tod(s):  # HH:MM:SS.mmm -> seconds of day
    h, m, rest = s.split(':'); return int(h)*3600 + int(m)*60 + float(rest)
win = collections.defaultdict(lambda: [0.0, 0, ''])
for line in open(tl):
    label, row, at, lat, ok = line.rstrip().split(',')
    at = float(at) / 1000.0; lat = float(lat)
    d = datetime.datetime.utcfromtimestamp(at)
    sod = d.hour*3600 + d.minute*60 + d.second + d.microsecond/1e6
    w = int(sod * 10)
    e = win[w]; e[0] = max(e[0], lat); e[1] += 1; e[2] = f'{label}|{row}'
waits = []
for line in open(pw):
    line = line.rstrip()
    if '|' not in line: continue
    t, w = line.split('|', 1); waits.append((tod(t), w))
procs = []
for line in open(pr):
    parts = line.split(' ', 1)
    try: procs.append((tod(parts[0]), parts[1].rstrip()))
    except Exception: pass
slow = sorted(w for w, e in win.items() if e[0] >= min_ms)
# merge adjacent windows into episodes
episodes = []
for w in slow:
    if episodes and w - episodes[-1][1] <= 3: episodes[-1][1] = w
    else: episodes.append([w, w])
def fmt(sod):
    h = int(sod // 3600); m = int(sod % 3600 // 60); s = sod % 60
    return f'{h:02d}:{m:02d}:{s:06.3f}'
for a, b in episodes:
    mx = max(win[w][0] for w in range(a, b+1) if w in win)
    print(f'=== episode {fmt(a/10)} - {fmt((b+1)/10)}  max {mx:.0f} ms  {win[a][2]}')
    lo, hi = a/10 - 0.4, (b+1)/10 + 0.1
    for w in range(int(lo*10), int(hi*10)+1):
        if w in win: print(f'   window {fmt(w/10)} max {win[w][0]:.0f} ms n={win[w][1]}')
    for t, w in waits:
        if lo <= t <= hi: print(f'   pg {fmt(t)} {w}')
    for t, p in procs:
        if lo <= t <= hi: print(f'   cpu {fmt(t)} {p}')
