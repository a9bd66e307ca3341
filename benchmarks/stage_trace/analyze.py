"""The stage timeline of `hook.py`'s TRACE lines: requests are split at each gateway chat call (run them one at a
time), the first three are skipped as warm-up, and each stage prints as its median offset from the call's start.

    python -m benchmarks.stage_trace.analyze cluster.log
"""

import collections
import statistics
import sys

events = []
with open(sys.argv[1], errors="replace") as fh:
    lines = fh.readlines()
for line in lines:
    i = line.find("TRACE ")
    if i < 0:
        continue
    parts = line[i:].split(maxsplit=3)
    if len(parts) < 4:
        continue
    events.append((float(parts[1]), parts[3].strip()))
events.sort()
reqs, cur = [], None
for t, label in events:
    if label == "gw.chat start":
        cur = [(t, label)]
        reqs.append(cur)
    elif cur is not None:
        cur.append((t, label))
table = collections.defaultdict(list)
for r in reqs[3:]:  # skip warm-ups
    t0 = r[0][0]
    seen = collections.Counter()
    for t, label in r:
        key = label.split(" seqs")[0] if label.startswith("sch.plan") else label
        seen[key] += 1
        table[f"{key} #{seen[key]}"].append(t - t0)
rows = sorted(table.items(), key=lambda kv: statistics.median(kv[1]))
for k, v in rows:
    if len(v) >= len(reqs[3:]) // 2:
        print(f"{statistics.median(v):8.2f} ms  {k}  (n={len(v)})")
