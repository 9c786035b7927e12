#!/usr/bin/env python3
"""Plain pageable `.to("cuda")` rates of freshly allocated 256 MiB host buffers, the process pinned to
each CPU in turn (twice) and unpinned (8 buffers); writes $OUT/affinity.json (or ./affinity.json)
with lscpu and numactl -H. Used for docs/validation.md, "the host's copy rate per buffer"."""
import os, time, json, statistics, subprocess, sys
import torch
out = {}
for cmd in (["lscpu"], ["numactl", "-H"], ["nproc"]):
    try:
        out[cmd[0]] = subprocess.run(cmd, capture_output=True, text=True).stdout
    except Exception as e:
        out[cmd[0]] = repr(e)
nodes = sorted(os.listdir("/sys/devices/system/node")) if os.path.isdir("/sys/devices/system/node") else []
out["nodes"] = nodes
torch.cuda.init(); torch.zeros(1, device="cuda")
N = 256 << 20
def rate(host):
    torch.cuda.synchronize(); t0 = time.perf_counter(); d = host.to("cuda"); torch.cuda.synchronize(); t = time.perf_counter() - t0; del d
    return host.numel() * host.element_size() / t / 1e9
cpus = sorted(os.sched_getaffinity(0))
rows = []
for rep in range(2):
    for c in cpus:
        os.sched_setaffinity(0, {c})
        host = torch.empty(N // 2, dtype=torch.bfloat16).fill_(0.5)
        r = [rate(host) for _ in range(3)]
        rows.append({"rep": rep, "cpu": c, "gbps": r})
        del host
os.sched_setaffinity(0, set(cpus))
free = []
for k in range(8):
    host = torch.empty(N // 2, dtype=torch.bfloat16).fill_(0.5)
    free.append([rate(host) for _ in range(3)])
    del host
out["rows"] = rows; out["unpinned"] = free
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "affinity.json"), "w"), indent=1)
print(out["lscpu"][:1500]); print(out.get("numactl -H", out.get("numactl"))[:500]); print("nodes", nodes)
for r in rows: print(r["rep"], r["cpu"], " ".join(f"{x:.2f}" for x in r["gbps"]))
print("unpinned", [" ".join(f"{x:.2f}" for x in f) for f in free])
