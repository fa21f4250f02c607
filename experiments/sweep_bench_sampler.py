"""RSS and CPU time of a running sweep's client and its pool processes, sampled from outside every 2 s,
with the cells its journal has recorded (how the memory of experiments/results/sweep_bench_plan.md's
local run was measured after its benchmark process could no longer write its own samples):

    python experiments/sweep_bench_sampler.py CLIENT_PID OUT/journal.jsonl samples.csv
"""

import json
import sys
import time

import psutil

pid = int(sys.argv[1])
journal = sys.argv[2]
out = open(sys.argv[3], "a")  # noqa: SIM115 (open for the process's life)
me = psutil.Process(pid)
out.write("t,cells,client_rss,workers_rss,n_workers,client_cpu,workers_cpu\n")
out.flush()
while me.is_running() and me.status() != psutil.STATUS_ZOMBIE:
    try:
        cells = 0
        with open(journal) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("part"):
                    cells += r["n"]
        kids = [k for k in me.children(recursive=True) if "spawn_main" in " ".join(k.cmdline())]
        out.write(f"{time.time()},{cells},{me.memory_info().rss},{sum(k.memory_info().rss for k in kids)},{len(kids)},"
                  f"{sum(me.cpu_times()[:2])},{sum(sum(k.cpu_times()[:2]) for k in kids)}\n")
        out.flush()
    except psutil.Error:
        pass
    time.sleep(2)
