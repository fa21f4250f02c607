#!/bin/sh
# Profile this machine inside cgroup v1 limits (blkio read throttle, CPU quota, memory limit) and
# print one CSV line per run. Needs root. Reproduces experiments/results/profile_limits.csv:
#   sudo sh experiments/profile_limits_sweep.sh > experiments/results/profile_limits.csv
cd "$(dirname "$0")/../.." && . .venv/bin/activate
DEV=$(python -c "from primasim.profile.profiler import block_device_of; from primasim.core.paths import cache_dir; print(block_device_of(cache_dir()).devno)")
echo "limit,value,loadavg_1m,cores,ram_total_gib,ram_avail_gib,ram_bw_gbs,cpu_gflops_f32,gemv_cold_gbs,disk_seq_gbs,disk_rnd_gbs,disk_seq_spread,seconds"
run() {  # $1 = label, $2 = value, $3.. = "ctrl:file:value" settings
  label=$1; value=$2; shift 2; LOAD=$(cut -d" " -f1 /proc/loadavg)
  S=primasim-sweep-$$-$label-$value
  for spec in "$@"; do c=${spec%%:*}; mkdir -p /sys/fs/cgroup/$c/$S; done
  for spec in "$@"; do c=${spec%%:*}; rest=${spec#*:}; f=${rest%%:*}; v=${rest#*:}; echo "$v" > /sys/fs/cgroup/$c/$S/$f; done
  joins=""; for spec in "$@"; do c=${spec%%:*}; joins="$joins echo \$\$ > /sys/fs/cgroup/$c/$S/cgroup.procs;"; done
  out=experiments/results/profile_sweep_tmp.toml
  sh -c "$joins exec python -m primasim.profile.profiler --out $out --name sweep --only $ONLY --json" > /tmp/sweep.json 2>/dev/null || true
  for spec in "$@"; do c=${spec%%:*}; rmdir /sys/fs/cgroup/$c/$S 2>/dev/null || true; done
  python - "$label" "$value" "$LOAD" <<'PY'
import json, sys
d = json.load(open("/tmp/sweep.json")); m = d["measurements"]; dev = d["device"]
g = lambda k, f=1e9: f"{m[k]['value'] / f:.4g}" if k in m else ""
sp = f"{m['disk_seq']['p25'] / 1e9:.4g}-{m['disk_seq']['p75'] / 1e9:.4g}" if "disk_seq" in m else ""
print(",".join([sys.argv[1], sys.argv[2], sys.argv[3], str(dev["cores"]), f"{dev['ram_total_gib']:.3f}", f"{dev['ram_avail_gib']:.3f}",
                g("ram_bw"), g("gemm"), g("gemv_cold_bw"), g("disk_seq"), g("disk_rnd"), sp, str(d["provenance"]["seconds"])]))
PY
}
ONLY=disk
for mbs in 25 50 100 200; do run blkio_read_mbs $mbs "blkio:blkio.throttle.read_bps_device:$DEV ${mbs}000000"; done
ONLY=memory,compute
for q in 25000 50000 100000 200000; do run cpu_quota_cores $(python -c "print($q/100000)") "cpu:cpu.cfs_quota_us:$q"; done
ONLY=none
for mib in 512 1024 2048; do run memory_limit_mib $mib "memory:memory.limit_in_bytes:$((mib*1024*1024))"; done
rm -f experiments/results/profile_sweep_tmp.toml experiments/results/profile_sweep_tmp.profile.json
