"""The worker's Recorder: spans and samples spilled to an unlinked temporary file come back exactly,
clear() empties it, and its Python heap stays bounded however many records it takes."""

from __future__ import annotations

import threading
import tracemalloc

from hypothesis import given, settings, strategies as st

from primasim.runtime.worker import Recorder

finite = st.floats(allow_nan=False, allow_infinity=False)
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.sampled_from(["cpu", "send", "net", "wait", "prefetch", "", "L0-3 lap 1", "to phone", "ü ∑"]) | st.text(max_size=12)
spans = st.lists(st.tuples(names, finite, finite, names, i64, i64, finite), max_size=60)
samples = st.lists(st.tuples(names, finite, finite), max_size=60)


@settings(max_examples=60, deadline=None)
@given(spans, samples, st.integers(1, 9), st.integers(0, 60))
def test_round_trip(sp: list[tuple], sm: list[tuple], flush: int, cut: int) -> None:
    rec = Recorder()
    rec.FLUSH = flush  # small buffers: most records go through the file
    try:
        for i, s in enumerate(sp):
            rec.span(*s)
            if i == cut:  # reading back in the middle must not disturb later writes
                assert rec.stats()[0] == [list(x) for x in sp[: i + 1]]
        for s in sm:
            rec.sample(*s)
        got_spans, got_samples = rec.stats()
        assert got_spans == [list(x) for x in sp]
        assert got_samples == [list(x) for x in sm]
        assert rec.stats() == (got_spans, got_samples)  # reading is not consuming
    finally:
        rec.close()


def test_defaults_clear_and_close() -> None:
    rec = Recorder()
    rec.span("cpu", 1.0, 2.0)
    rec.sample("batch_size", 1.5, 3.0)
    rec.add("net_tx_bytes", 10.0)
    assert rec.stats() == ([["cpu", 1.0, 2.0, "", 0, -1, 0.0]], [["batch_size", 1.5, 3.0]])
    rec.clear()
    assert rec.stats() == ([], []) and not rec.counters
    rec.span("wait", 3.0, 4.0, "wait for input", 2, 7)
    assert rec.stats() == ([["wait", 3.0, 4.0, "wait for input", 2, 7, 0.0]], [])
    rec.close()
    rec.span("send", 5.0, 6.0)  # a background thread recording after close() is dropped, not an error
    rec.clear()
    assert all(f.closed for f in rec._files.values())


def test_threads() -> None:
    rec = Recorder()
    rec.FLUSH = 16

    def work(k: int) -> None:
        for i in range(2000):
            rec.span("cpu", float(i), i + 0.5, f"t{k}", k, i)
            rec.sample(f"s{k}", float(i), float(k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got_spans, got_samples = rec.stats()
    rec.close()
    for k in range(4):
        assert [s[5] for s in got_spans if s[3] == f"t{k}"] == list(range(2000))
        assert sum(1 for s in got_samples if s[0] == f"s{k}") == 2000


def test_heap_bounded() -> None:
    """100,000 spans and samples: the Python heap grows by the buffers only (FLUSH records per
    kind, ~0.3 MiB), where lists held ~25 MiB."""
    rec = Recorder()
    labels = [f"L{i}-{i + 3} lap {i % 2}" for i in range(8)]
    tracemalloc.start()
    try:
        rec.span("cpu", 0.0, 1.0, labels[0])
        rec.sample("disk_read_bytes", 0.0, 0.0)
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            rec.span("cpu", i * 0.01, i * 0.01 + 0.005, labels[i % 8], 0, i, 4096.0)
            rec.sample("disk_read_bytes", i * 0.01, float(i))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, grown
    assert len(rec.stats()[0]) == 100_001
    rec.close()
