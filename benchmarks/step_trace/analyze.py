"""Summary of `hook.py`'s STEP lines: steps by kind (prompt-only, mixed, decode-only) with their worker time
(`fwd`: the step's CUDA-event time on the worker's stream, which includes any wait on the vision service's ready
event and the GPU time-sliced to the vision process), decode rows per step, the scheduler's running and waiting
counts, and the vision batches. Steps overlap (the scheduler plans one ahead), so their wall times add up to more
than the run.

    python -m benchmarks.step_trace.analyze cluster.log [SKIP_S]
"""

import re
import statistics as st
import sys
from collections import defaultdict


def kv(s):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", s)}


plans, outs, vb, enc = {}, {}, [], []
gw: dict[str, list[dict]] = {"gw": [], "gwb": [], "gws": []}
with open(sys.argv[1], errors="replace") as fh:
    lines = fh.readlines()
for line in lines:
    i = line.find("STEP ")
    if i < 0:
        continue
    parts = line[i:].split(None, 3)
    if len(parts) < 3 or not parts[1][0].isdigit():
        continue
    t, kind = float(parts[1]), parts[2]
    d = kv(parts[3] if len(parts) > 3 else "")
    d["t"] = t
    if kind == "plan":
        plans[int(d["id"])] = d
    elif kind == "out":
        outs[int(d["id"])] = d
    elif kind == "vbatch":
        vb.append(d)
    elif kind == "encoded":
        enc.append(d)
    elif kind in gw:
        gw[kind].append(d)
ids = sorted(i for i in plans if i in outs and (plans[i]["ptok"] or plans[i]["dec"]))
if len(sys.argv) > 2:  # only steps after this many seconds from the first
    t0 = plans[ids[0]]["t"] + float(sys.argv[2]) * 1e3
    ids = [i for i in ids if plans[i]["t"] >= t0]
kinds = defaultdict(list)
for i in ids:
    p, o = plans[i], outs[i]
    k = "prompt" if p["ptok"] and not p["dec"] else "mixed" if p["ptok"] else "decode"
    kinds[k].append((o["end"] - o["start"], o["fwd"], p["ptok"], p["dec"], p["pseq"]))
wall = (outs[ids[-1]]["end"] - outs[ids[0]]["start"]) / 1e3
print(
    f"steps {len(ids)} over {wall:.2f} s; tokens sampled ~{sum(plans[i]['dec'] + plans[i]['pseq'] for i in ids):.0f}"
)
for k, v in kinds.items():
    w = [x[0] for x in v]
    f = [x[1] for x in v]
    print(
        f"  {k:7s} n={len(v):4d} wall sum {sum(w) / 1e3:6.2f} s mean {st.mean(w):6.2f} ms, fwd mean {st.mean(f):6.2f} ms,"
        f" ptok mean {st.mean(x[2] for x in v):6.0f}, pseq mean {st.mean(x[4] for x in v):4.1f}, dec mean {st.mean(x[3] for x in v):5.1f}"
    )
busy = sum(outs[i]["fwd"] for i in ids)
print(f"worker stream busy (sum of fwd / run wall): {busy / 1e3 / wall:.3f}")
dec = [plans[i]["dec"] for i in ids if plans[i]["dec"]]
if dec:
    print(
        f"decode rows per step with decodes: mean {st.mean(dec):.1f}, p10 {sorted(dec)[len(dec) // 10]:.0f}, p50 {st.median(dec):.0f}"
    )
span = plans[ids[-1]]["t"] - plans[ids[0]]["t"]
run_w = (
    sum(plans[a]["run"] * (plans[b]["t"] - plans[a]["t"]) for a, b in zip(ids, ids[1:], strict=False)) / span
)
wait_w = (
    sum(plans[a]["wait"] * (plans[b]["t"] - plans[a]["t"]) for a, b in zip(ids, ids[1:], strict=False)) / span
)
print(f"scheduler (time-weighted): running mean {run_w:.1f}, waiting mean {wait_w:.1f}")
t_a, t_b = plans[ids[0]]["t"], plans[ids[-1]]["t"]


def time_weighted(events: list[dict]) -> float:
    """Mean of a count over [t_a, t_b], from the lines that set it."""
    area, last_t, last_n = 0.0, t_a, None
    for d in events:
        if d["t"] < t_a:
            last_n = d["n"]
            continue
        if d["t"] > t_b:
            break
        if last_n is not None:
            area += last_n * (d["t"] - last_t)
        last_t, last_n = d["t"], d["n"]
    if last_n is not None:
        area += last_n * (t_b - last_t)
    return area / (t_b - t_a)


if gw["gw"]:
    print(
        f"gateway (time-weighted): requests in flight {time_weighted(gw['gw']):.1f} (handler start to the end of "
        f"the stream), building prompts {time_weighted(gw['gwb']):.1f}, with the scheduler client "
        f"{time_weighted(gw['gws']):.1f}"
    )
if vb:
    n = [d["n"] for d in vb]
    dur = [d["t"] - d["start"] for d in vb]
    print(
        f"vision batches {len(vb)}: images {sum(n):.0f}, per batch mean {st.mean(n):.1f} max {max(n):.0f}; wall launch->done mean {st.mean(dur):.1f} ms, sum {sum(dur) / 1e3:.2f} s"
    )
