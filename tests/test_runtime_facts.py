"""primasim/core/runtime_facts.py states what the runtime does and the simulator models: the residency
decision both share, and the KV caches, spans and buckets the runtime really uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

from primasim import load_model
from primasim.core import runtime_facts as facts
from primasim.core.runtime_facts import (
    ACT_RESERVE,
    anon_reserve,
    attention_span,
    kv_bytes,
    plan_residency,
    residency_mode,
)

MB = 1e6
layers = st.dictionaries(st.integers(0, 79), st.floats(1 * MB, 500 * MB), min_size=1, max_size=40)


@given(layers, st.floats(0, 20_000 * MB), st.floats(0, 600 * MB), st.booleans())
@example({0: 181817807.30019155, 1: 19478831.089613657, 2: 107371765.9318921}, 520130583.5057389,
         387402348.7773967, False)  # the output takes all but one layer's room: keep_fraction was 2e-16, not 0
@settings(max_examples=300, deadline=None)
def test_planned_residency_never_plans_more_than_the_budget(lay: dict[int, float], budget: float, out: float,
                                                           prefetch: bool) -> None:
    p = plan_residency("planned", budget, lay, out, prefetch=prefetch)
    window = sum(lay.values())
    if window + out <= budget:
        assert p.state == "fits" and p.resident_bytes == pytest.approx(window + out) and not p.streamed
        return
    assert p.state == "streams" and 0.0 <= p.keep_fraction < 1.0
    big = max(lay.values())
    c = 2.0 if p.stream_prefetch else 1.0
    if p.keep_fraction > 0:  # kept + room for c streamed parts fits what is left beside the output layer
        assert p.keep_fraction * window + c * (1 - p.keep_fraction) * big <= budget - out + 1e-6 * window
    # a token streams at least what does not fit
    assert sum(p.streamed.values()) >= min(window, window + out - budget) - 1e-6 * window
    assert p.stream_prefetch <= prefetch


@given(layers, st.floats(0, 20_000 * MB), st.floats(0, 600 * MB), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_output_layer_stays_beside_the_streamed_layers_and_streams_what_does_not_fit(
        lay: dict[int, float], budget: float, out: float, prefetch: bool) -> None:
    p = plan_residency("planned", budget, lay, out, prefetch=prefetch)
    if p.state != "streams":
        return
    window, big = sum(lay.values()), max(lay.values())
    c = 2.0 if p.stream_prefetch else 1.0
    kept_out = out - p.output_streamed
    assert 0.0 <= p.output_streamed <= out + 1e-9
    assert p.resident_bytes == pytest.approx(p.keep_fraction * window + kept_out, abs=1e-6 * (window + out))
    if p.output_streamed > 1e-9 * out:  # it did not fit beside c streamed layers: nothing of a layer is kept
        assert p.keep_fraction == 0.0
        assert kept_out + c * big <= max(budget, c * big) * (1 + 1e-9)
    # a token streams at least what does not fit, the output's part included
    assert sum(p.streamed.values()) + p.output_streamed >= window + out - budget - 1e-6 * (window + out)


@given(layers, st.floats(0, 5000 * MB), st.floats(1, 5000 * MB))
@settings(max_examples=200, deadline=None)
def test_more_memory_never_streams_more(lay: dict[int, float], budget: float, extra: float) -> None:
    a = plan_residency("planned", budget, lay, 0.0, prefetch=False)
    b = plan_residency("planned", budget + extra, lay, 0.0, prefetch=False)
    assert sum(b.streamed.values()) <= sum(a.streamed.values()) + 1e-6 * sum(lay.values())


def test_lru_leaves_it_to_the_kernel_and_prefetches_only_a_ring_short_of_memory() -> None:
    lay = {i: 60 * MB for i in range(10)}
    short = plan_residency("lru", 300 * MB, lay, 0.0, prefetch=True, ring=3)
    assert short.state == "lru" and short.window_prefetch and not short.streamed
    assert short.resident_bytes == pytest.approx(300 * MB)
    assert not plan_residency("lru", 300 * MB, lay, 0.0, prefetch=True, ring=1).window_prefetch  # llama.cpp
    assert not plan_residency("lru", 300 * MB, lay, 0.0, prefetch=False, ring=3).window_prefetch
    fits = plan_residency("lru", 700 * MB, lay, 0.0, prefetch=True, ring=3)
    assert fits.state == "fits" and not fits.window_prefetch  # a resident window's hint only costs CPU
    assert plan_residency("planned", 1.0, lay, 0.0, pinned=True).state == "pinned"
    assert plan_residency("lru", 1.0, {}, 5 * MB).state == "none"


def test_names_and_formulas() -> None:
    assert residency_mode("plan") == "planned" and residency_mode("kernel") == "lru"
    with pytest.raises(ValueError, match="planned or lru"):
        residency_mode("fifo")
    assert kv_bytes(16, 1024, 4, 64) == 2 * 16 * 1024 * 4 * 64 * 4
    assert anon_reserve(16, 1024, 4, 64, 3) == 3 * kv_bytes(16, 1024, 4, 64) + ACT_RESERVE
    assert attention_span(1, 4096) == 256 and attention_span(257, 4096) == 512 and attention_span(300, 280) == 280
    assert attention_span(1000, 1000, quantum=16) == 1008


def test_the_kv_caches_the_runtime_allocates_are_the_stated_bytes() -> None:
    from primasim.runtime._kvcache import PagedKVPool
    from primasim.runtime.model import init_kv

    spec = load_model("llama-tiny")
    kv = init_kv(spec, [0, 1, 2], max_seq=100)
    assert kv.nbytes == facts.kv_bytes(3, 101, spec.n_kv_heads, spec.head_dim)  # init_kv keeps one spare position
    pool = PagedKVPool(spec, [0, 1], n_blocks=5)
    assert pool.block_bytes == facts.kv_bytes(2, facts.BLOCK_TOKENS, spec.n_kv_heads, spec.head_dim)
    assert sum(k.nbytes + v.nbytes for k, v in pool.layers.values()) == 5 * pool.block_bytes


def test_the_runtime_model_accounts_what_a_worker_reserves() -> None:
    spec = facts.runtime_model(load_model("llama-mini-300m"))
    assert spec.kv_dtype == "f32" and spec.buffer_bytes == facts.ACT_RESERVE
    assert facts.anon_reserve(4, 1024, spec.n_kv_heads, spec.head_dim) == 4 * 1024 * spec.kv_bytes_per_token() + facts.ACT_RESERVE


def test_attention_spans_and_batch_buckets() -> None:
    assert [facts.attention_span(n, 4096) for n in (1, 256, 257, 600)] == [256, 256, 512, 1024]
    assert facts.attention_span(5000, 4096) == 4096
    assert [facts.batch_bucket(n) for n in (1, 3, 64, 65, 200)] == [1, 4, 64, 128, 200]


def test_planning_commands_load_neither_jax_nor_zmq(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom primasim.cli import main\n"
            "main(['plan', '--cluster', 'prima-d1-d4', '--model', 'llama3-8b', '--json'])\n"
            "main(['simulate', '--cluster', 'prima-d1-d4', '--model', 'llama3-8b', '--tokens', '2', '--json'])\n"
            "print('LOADED', sorted(m for m in ('jax', 'zmq', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip().splitlines()[-1] == "LOADED []", out.stdout[-500:]


def test_devices_pinned_to_one_host_cpu_share_it_while_they_compute_at_once() -> None:
    """runtime/emulate.py pins single-thread devices to host CPUs by runtime_facts.emulated_cpus;
    while two devices' jobs run on one CPU each gets half of it -- the one already running as well
    as the one that arrived (processor sharing) -- and each device's quota still applies."""
    import simpy

    from primasim.core.device import DeviceSpec, EmulationSpec
    from primasim.core.runtime_facts import emulated_cpus
    from primasim.sim._cpu import CpuQuota, HostCpu

    MS = 1e-3
    dev = DeviceSpec(name="q", os="linux", cores=1, ram_total=2**30, ram_avail=2**30, ram_bw=1e10,
                     cpu_flops={"f32": 4e10}, disk_seq=3e8)
    assert [emulated_cpus(i, 1, 0.6, [0, 1]) for i in range(4)] == [[0], [1], [0], [1]]
    assert emulated_cpus(1, 2, 1.5, [0, 1, 2, 3]) == [2, 3]

    def ends(cores: tuple[float | None, ...], jobs: list[tuple[int, float, float]]) -> list[float]:
        """End times of jobs (device, start, profiled seconds) on one shared host CPU."""
        env = simpy.Environment()
        host = HostCpu(env)  # one CPU of a host of its own
        quotas = [CpuQuota(type("D", (), {"spec": dev if c is None else dev.replace(
            emulate=EmulationSpec(cpu_quota=c, cpu_period=10 * MS, threads=1))})(), host=host) for c in cores]
        out = [0.0] * len(jobs)

        def job(i: int, d: int, t0: float, work: float):  # type: ignore[no-untyped-def]
            yield env.timeout(t0)
            yield quotas[d].start(env.now, work)  # (the device's cpu Server's `runner`)
            out[i] = env.now

        for i, (d, t0, w) in enumerate(jobs):
            env.process(job(i, d, t0, w))
        env.run()
        return out

    # alone: a burst at full speed (4 ms at the 0.5-core average rate = 2 ms of CPU)
    assert ends((0.5,), [(0, 0.0, 4 * MS)]) == pytest.approx([2 * MS])
    # b arrives at 1 ms while a runs: both at half speed until a's last 1 ms of CPU is done (3 ms),
    # then b's last 1 ms alone -- a is slowed too (the CPU does 1 s of work per second, not 1.5)
    assert ends((0.5, 0.5), [(0, 0.0, 4 * MS), (1, 1 * MS, 4 * MS)]) == pytest.approx([3 * MS, 4 * MS])
    # the same on CPUs of their own (`duration`, no host): neither slows the other
    alone = CpuQuota(type("D", (), {"spec": dev.replace(emulate=EmulationSpec(cpu_quota=0.5, cpu_period=10 * MS,
                                                                              threads=1))})())
    assert alone.duration(0.0, 4 * MS) == pytest.approx(2 * MS)
    # without quotas the shared CPU alone slows them: 5 ms shared (2.5 of work each), then alone
    assert ends((None, None), [(0, 0.0, 10 * MS), (1, 0.0, 5 * MS)]) == pytest.approx([15 * MS, 10 * MS])
    # a throttled device leaves the CPU to the other: the 0.1-core one (5 ms of CPU, a 0.9 ms budget
    # per period: 1 ms less the background threads' share) runs at half speed until the tick at 4 ms
    # finds its pool spent (-1.1 ms), repays the debt over two refills and finishes alone from 20 ms;
    # the other runs alone from 4 ms
    assert ends((0.1, None), [(0, 0.0, 50 * MS), (1, 0.0, 10 * MS)]) == pytest.approx([23 * MS, 12 * MS])


def test_two_host_cpus_computing_at_once_slow_each_other_by_the_measured_contention() -> None:
    """While devices on different host CPUs compute at once, each one's work takes HOST_CONTENTION
    times the CPU time (experiments/host_contention.py), and its quota is charged that CPU time;
    alone, or on one CPU only, nothing changes."""
    import simpy

    from primasim.core.device import DeviceSpec, EmulationSpec
    from primasim.sim._cpu import CpuQuota, Host, HostCpu

    MS = 1e-3
    dev = DeviceSpec(name="q", os="linux", cores=1, ram_total=2**30, ram_avail=2**30, ram_bw=1e10,
                     cpu_flops={"f32": 4e10}, disk_seq=3e8)

    def ends(c: float, jobs: list[tuple[int, float, float]], cores: float | None = None) -> list[float]:
        """End times of jobs (host CPU, start, profiled seconds), one device per job."""
        env = simpy.Environment()
        host = Host(env, contention=c)
        spec = dev if cores is None else dev.replace(emulate=EmulationSpec(cpu_quota=cores, cpu_period=10 * MS, threads=1))
        out = [0.0] * len(jobs)

        def job(i: int, cpu: int, t0: float, work: float):  # type: ignore[no-untyped-def]
            q = CpuQuota(type("D", (), {"spec": spec})(), host=HostCpu(host, cpu))
            yield env.timeout(t0)
            yield q.start(env.now, work)
            out[i] = env.now

        for i, (cpu, t0, w) in enumerate(jobs):
            env.process(job(i, cpu, t0, w))
        env.run()
        return out

    assert ends(1.25, [(0, 0.0, 10 * MS)]) == pytest.approx([10 * MS])  # alone: no contention
    # both at once from 0: 1.25x each while both run; the 4 ms job ends at 5 ms, then the other
    # has 10 - 4 = 6 ms of work left alone
    assert ends(1.25, [(0, 0.0, 10 * MS), (1, 0.0, 4 * MS)]) == pytest.approx([11 * MS, 5 * MS])
    assert ends(1.0, [(0, 0.0, 10 * MS), (1, 0.0, 4 * MS)]) == pytest.approx([10 * MS, 4 * MS])
    # two devices on the *same* CPU share it, with no cross-CPU contention
    assert ends(1.25, [(0, 0.0, 10 * MS), (0, 0.0, 4 * MS)]) == pytest.approx([14 * MS, 8 * MS])
    # the quota is charged CPU time: at 0.5 core (a 4.9 ms budget), 4 ms of work alone fits one
    # burst, but at 1.25x it takes 5 ms of CPU, past the budget: the tick at 8 ms is not reached
    # before the end, so it still ends in the first period, at 5 ms
    assert ends(1.25, [(0, 0.0, 8 * MS), (1, 0.0, 8 * MS)], cores=0.5) == pytest.approx([5 * MS, 5 * MS])


def test_a_shared_host_cpu_reports_the_cpu_time_it_charged() -> None:
    """`CpuQuota.used`: the CPU-seconds a device was charged on a shared host CPU, contention
    included and the planning of completions (which runs ahead and rolls back) not counted."""
    import simpy

    from primasim.core.device import DeviceSpec
    from primasim.sim._cpu import CpuQuota, Host, HostCpu

    MS = 1e-3
    dev = DeviceSpec(name="q", os="linux", cores=1, ram_total=2**30, ram_avail=2**30, ram_bw=1e10,
                     cpu_flops={"f32": 4e10}, disk_seq=3e8)
    env = simpy.Environment()
    host = Host(env, contention=1.25)
    qs = [CpuQuota(type("D", (), {"spec": dev})(), host=HostCpu(host, cpu)) for cpu in (0, 1)]

    def job(q: CpuQuota, work: float):  # type: ignore[no-untyped-def]
        yield q.start(env.now, work)

    env.process(job(qs[0], 10 * MS))
    env.process(job(qs[1], 4 * MS))
    env.run()
    # together for 5 ms (4 ms of work at 1.25x on each), then 6 ms alone
    assert [q.used for q in qs] == pytest.approx([11 * MS, 5 * MS])
