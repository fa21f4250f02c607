"""The residency decision the worker and the simulator share (primasim.core.runtime_facts)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

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
