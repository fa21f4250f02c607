"""The event layer on its own: the `Server` every simulated device resource is built from, checked
against queueing theory (M/M/1, M/D/1 mean waits) and sample-path laws (work conservation,
Little's law) before any LLM modelling relies on it."""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import given, settings, strategies as st

from primasim.sim import Server


def _run_fifo(arrivals: np.ndarray, services: np.ndarray, capacity: int = 1,
              priorities: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, Server]:
    """Feed jobs (absolute arrival times) through one Server; return start and departure times."""
    env = simpy.Environment()
    srv = Server(env, capacity=capacity, priority=priorities is not None)
    n = len(arrivals)
    start = np.zeros(n)
    depart = np.zeros(n)

    def job(i: int):
        req = srv.acquire(priorities[i] if priorities is not None else 0)
        yield req
        start[i] = env.now
        yield from srv.work(float(services[i]))
        srv.release(req)
        depart[i] = env.now

    def source():
        t = 0.0
        for i in range(n):
            dt = float(arrivals[i]) - t
            if dt > 0:
                yield env.timeout(dt)
            t = float(arrivals[i])
            env.process(job(i))

    env.process(source())
    env.run()
    return start, depart, srv


def _mean_wait(kind: str, lam: float, mu: float, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / lam, n))
    services = rng.exponential(1 / mu, n) if kind == "M" else np.full(n, 1 / mu)
    start, _, _ = _run_fifo(arrivals, services)
    warm = n // 20  # drop the empty-start transient
    return float(np.mean(start[warm:] - arrivals[warm:]))


@pytest.mark.parametrize("rho,n", [(0.3, 600_000), pytest.param(0.5, 1_000_000, marks=pytest.mark.slow)])
def test_mm1_mean_wait_matches_closed_form(rho: float, n: int) -> None:
    # exponential service makes the sample mean noisy (about 0.6 % at 600k jobs, rho = 0.3):
    # long runs keep the 2 % bound several standard errors away
    mu = 1.0
    lam = rho * mu
    wq = rho / (mu - lam)  # M/M/1: Wq = rho / (mu - lambda)
    got = _mean_wait("M", lam, mu, n, seed=7)
    assert got == pytest.approx(wq, rel=0.02)


@pytest.mark.parametrize("rho", [0.3, 0.6])
def test_md1_mean_wait_matches_pollaczek_khinchine(rho: float) -> None:
    mu = 1.0
    lam = rho * mu
    wq = rho / (2 * mu * (1 - rho))  # M/D/1 (Pollaczek-Khinchine with zero service variance)
    got = _mean_wait("D", lam, mu, 250_000, seed=11)
    assert got == pytest.approx(wq, rel=0.02)


jobs = st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.001, 3.0)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(jobs)
def test_work_conservation_single_server(js: list[tuple[float, float]]) -> None:
    """FIFO single server never idles while work waits: departures follow Lindley's recursion."""
    arrivals = np.cumsum([g for g, _ in js])
    services = np.array([s for _, s in js])
    start, depart, srv = _run_fifo(arrivals, services)
    d = 0.0
    for a, s, dep in zip(arrivals, services, depart):
        d = max(a, d) + s
        assert dep == pytest.approx(d, abs=1e-9)
    assert srv.busy_time == pytest.approx(services.sum(), rel=1e-12)
    assert np.all(start >= arrivals - 1e-12)


@settings(max_examples=60, deadline=None)
@given(jobs, st.integers(1, 4))
def test_work_conservation_multi_server(js: list[tuple[float, float]], c: int) -> None:
    """With c servers, no server idles while a job waits: a job starts at its arrival or at the
    moment some earlier job departs, and all work gets done."""
    arrivals = np.cumsum([g for g, _ in js])
    services = np.array([s for _, s in js])
    start, depart, srv = _run_fifo(arrivals, services, capacity=c)
    assert srv.busy_time == pytest.approx(services.sum(), rel=1e-12)
    for i in range(len(js)):
        if start[i] > arrivals[i] + 1e-12:
            # it waited: then at its start a server was just freed
            assert np.any(np.isclose(depart[:i], start[i], atol=1e-9))
        # at any start, at most c jobs are in service
        busy = np.sum((start <= start[i] + 1e-12) & (depart > start[i] + 1e-12))
        assert busy <= c


@settings(max_examples=60, deadline=None)
@given(jobs, st.integers(1, 3))
def test_littles_law_sample_path(js: list[tuple[float, float]], c: int) -> None:
    """L = lambda W exactly over a busy period that ends empty: time-average number in system
    (integrated from the arrival/departure timeline) equals the sum of sojourns over the horizon."""
    arrivals = np.cumsum([g for g, _ in js])
    services = np.array([s for _, s in js])
    _, depart, _ = _run_fifo(arrivals, services, capacity=c)
    T = float(depart.max())
    events = sorted([(a, +1) for a in arrivals] + [(d, -1) for d in depart])
    area, n_in, t_prev = 0.0, 0, 0.0
    for t, step in events:
        area += n_in * (t - t_prev)
        n_in += step
        t_prev = t
    L = area / T
    lam = len(js) / T
    W = float(np.mean(depart - arrivals))
    assert n_in == 0
    assert L == pytest.approx(lam * W, rel=1e-9, abs=1e-12)


def test_priority_server_serves_urgent_jobs_first() -> None:
    """Demand page faults (priority 0) overtake queued prefetch reads (priority 1) on the disk."""
    arrivals = np.array([0.0, 0.1, 0.2, 0.3])
    services = np.array([1.0, 1.0, 1.0, 1.0])
    start, _, _ = _run_fifo(arrivals, services, priorities=[1, 1, 1, 0])
    assert start[3] == pytest.approx(1.0)  # the urgent job goes right after the one in service
    assert start[1] == pytest.approx(2.0) and start[2] == pytest.approx(3.0)
