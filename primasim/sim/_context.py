"""One simulation's world (environment, devices, network, trace) and its result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from primasim.core.cluster import ClusterSpec
from primasim.core.model import ModelSpec
from primasim.core.plan import Plan, device_memory
from primasim.core.trace import Metrics, Request, Trace, metrics, result_json

from ._config import SimConfig
from ._devices import SimDevice
from ._engine import Recorder
from ._network import Network


class SimContext:
    """The SimPy environment with every device of `cluster` and its network."""

    def __init__(self, system: str, model: ModelSpec, cluster: ClusterSpec, plan: Plan | None,
                 cfg: SimConfig) -> None:
        self.system = system
        self.model = model
        self.cluster = cluster
        self.plan = plan
        self.cfg = cfg
        self.env = simpy.Environment()
        self.rng = np.random.default_rng(cfg.seed)
        self.trace = Trace(source="sim", system=system)
        self.rec = Recorder(self.trace, spans=cfg.record_spans)
        self.net = Network(self.env, cluster.network, rng=self.rng, recorder=self.rec, jitter=cfg.jitter,
                           frames=cfg.wifi_frames, buckets=cfg.link_buckets)
        names = [d.name for d in plan.devices] if plan is not None else cluster.names
        self.devices: dict[str, SimDevice] = {
            n: SimDevice(self.env, cluster.device(n), model, recorder=self.rec, fault_efficiency=cfg.fault_efficiency,
                         roofline=cfg.roofline and not cfg.runtime) for n in names}

    def dev(self, name: str) -> SimDevice:
        return self.devices[name]

    def request(self, seq: int, prompt_tokens: int, max_new: int, arrival: float | None = None) -> None:
        t = self.env.now if arrival is None else arrival
        self.trace.requests.append(Request(seq, t, prompt_tokens, max_new))

    def emit(self, seq: int, index: int) -> None:
        self.trace.token(seq, index, self.env.now)

    def sample_residency(self) -> None:
        for d in self.devices.values():
            d.sample_residency()

    def setup_plan_memory(self, *, mmap: bool) -> None:
        """Reserve each device's anonymous memory (KV, buffers, pinned weights) from the plan."""
        assert self.plan is not None
        plan = self.plan
        mem = device_memory(plan, self.model, self.cluster)
        tot = plan.totals()
        for name, d in self.devices.items():
            m = mem[name]
            anon = m.kv_cpu + m.buffers_cpu
            if d.spec.uma:
                anon += m.kv_gpu + uma_gpu_buffers(plan, self.model, name, tot.get(name, (0, 0)))
                if m.buffers_cpu and not cpu_buffer_allocated(plan, name, tot.get(name, (0, 0))):
                    anon -= m.buffers_cpu
            if not mmap:
                anon += m.weights_cpu + (m.weights_gpu if d.spec.uma else 0.0)
            d.setup_memory(anon, mmap=mmap)

    def run(self, until: simpy.events.Event | None = None) -> None:
        if until is None:
            self.env.run(until=self.cfg.max_sim_time)
        else:
            self.env.run(until=until)

    def result(self, *, extra: dict[str, Any] | None = None) -> SimResult:
        for d in self.devices.values():
            if d.cache is not None:
                st = d.cache.stats
                for k in ("faults", "fault_bytes", "prefetch_bytes", "evicted_bytes", "wasted_prefetch_bytes",
                          "swapped_out_bytes"):
                    self.rec.set(d.name, f"cache_{k}", float(getattr(st, k)))
                self.rec.set(d.name, "cache_capacity_bytes", d.cache.capacity)
                # admitted (and counted above) but still being read when the run ended
                self.rec.set(d.name, "cache_inflight_bytes", float(sum(d.cache.size[c] for c in d.loading)))
        self.trace.meta.update({"model": self.model.name, "quant": self.model.quant, "cluster": self.cluster.name,
                                "seed": self.cfg.seed, "tokens": self.cfg.tokens,
                                "prompt_tokens": self.cfg.prompt_tokens,
                                "net_messages": self.net.messages, "airtime_busy_s": self.net.airtime_busy()})
        m = metrics(self.trace)
        return SimResult(self.system, True, "", self.plan, self.trace, m, self.cfg, dict(extra or {}))


@dataclass
class SimResult:
    """What one simulation predicts: the trace, its metrics, and the plan that was simulated."""

    system: str
    feasible: bool
    reason: str
    plan: Plan | None
    trace: Trace | None
    metrics: Metrics | None
    config: SimConfig
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tpot_ms(self) -> float:
        return self.metrics.tpot_ms if self.metrics is not None else math.inf

    @property
    def throughput(self) -> float:
        return self.metrics.throughput_tok_s if self.metrics is not None else 0.0

    def to_json(self) -> dict[str, Any]:
        """The contract's `--json` object (result_json), plus simulator extras."""
        extra = dict(self.extra)
        if self.trace is not None:
            st = self.trace.device_stats
            extra.setdefault("page_faults", {d: s.get("page_faults", 0.0) for d, s in st.items()})
            extra.setdefault("net_rx_bytes", {d: s.get("net_rx_bytes", 0.0) for d, s in st.items()})
        return result_json(self.system, feasible=self.feasible, plan=self.plan, m=self.metrics,
                           reason=self.reason, source="sim", **extra)

    def table(self) -> Any:
        """One row per device: busy fractions, disk and network bytes, faults, memory pressure."""
        import pandas as pd  # the table view only (`simulate --table`)

        if self.metrics is None or self.trace is None:
            return pd.DataFrame(columns=["device"])
        m = self.metrics
        rows = []
        tot = self.plan.totals() if self.plan is not None else {}
        for d in sorted(set(m.busy) | set(self.trace.device_stats)):
            st = self.trace.device_stats.get(d, {})
            lm, lg = tot.get(d, (0, 0))
            row: dict[str, Any] = {"device": d, "layers": lm, "gpu_layers": lg}
            for r, f in m.busy.get(d, {}).items():
                row[f"busy_{r}"] = f
            row.update(disk_read_gb=st.get("disk_read_bytes", 0.0) / 1e9,
                       net_tx_mb=st.get("net_tx_bytes", 0.0) / 1e6,
                       page_faults=st.get("page_faults", 0.0),
                       memory_pressure=m.memory_pressure.get(d, float("nan")))
            rows.append(row)
        return pd.DataFrame(rows)


def infeasible(system: str, reason: str, plan: Plan | None, cfg: SimConfig, **extra: Any) -> SimResult:
    return SimResult(system, False, reason, plan, None, None, cfg, dict(extra))


# What a unified-memory (Metal) device really allocates in RAM for its compute graphs. The planners
# (primasim.core.plan.device_memory) budget prima.cpp's way: the model's compute-buffer estimate for the
# CPU backend plus a fixed GPU reserve (+300 MiB for Metal), a safety margin of prima.cpp's Halda,
# not an allocation. On a UMA device the simulator charges what llama.cpp allocates: one graph
# buffer on the backend that runs the layers (Metal: the same activation estimate), and a CPU
# buffer only where the CPU computes (CPU layers, or the head's output layer).
def uma_gpu_buffers(plan: Plan, model: ModelSpec, name: str, totals: tuple[int, int]) -> float:
    """RAM a Metal device's compute buffer takes (0 without GPU layers)."""
    return model.compute_buffer_bytes(plan.n_ctx) if totals[1] > 0 else 0.0


def cpu_buffer_allocated(plan: Plan, name: str, totals: tuple[int, int]) -> bool:
    """Whether a device allocates a CPU compute buffer: it runs CPU layers or the output layer."""
    lm, lg = totals
    return lm > lg or name == plan.head
