"""A serving worker warms up before it reads its weights, on every slot's cache, and gives the
warm-up's temporaries back (runtime/worker/session.py `Session.load`).

`primasim serve` compiles prompt lengths up to the context and runs every one of them once at LOAD
on zero weights. Their temporaries stayed in the C heap (llama-mini-300m, 15 layers, buckets
16/64/256, 2 slots: +20 MiB RssAnon, more than ACT_RESERVE), and when they came after the weights
had been read into a device's memory they pushed its cgroup past its limit: the kernel evicted
kept weight pages, and a window read in a cycle then faulted on every page (15-30 s a token on
the emulated desktop holding 15 of 16 layers, where `primasim run` of the plan took 73 ms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from primasim.runtime.worker import residency as rs, session as ss


class _Worker:
    model_override = None
    ctx = None
    keys = None

    def emit(self, *_a: Any, **_k: Any) -> None:
        pass


def _setup(path: Path, serving: bool) -> dict[str, Any]:
    return {"device": "d", "head": True, "segments": [["d", 0, 0, 2]], "ring": ["d"], "successor": "d",
            "successor_data": "", "model_path": str(path), "max_seq": 128, "warmup_lengths": [16, 64, 128, 1],
            "schedule": "rpp", "options": {"S": 2, **({"serving": True} if serving else {})}, "prefetch": False,
            "weights": "mmap", "residency": "planned", "in_flight": 2}


@pytest.mark.parametrize("serving", [True, False])
def test_a_server_warms_every_slot_before_reading_weights_and_trims(llama_tiny: Path, serving: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    compile_ = ss.Session._compile
    touch = rs.touch_pages

    def compiled(self: ss.Session, lengths: list[int], kv: Any = None) -> Any:
        if kv is not None:  # a warm-up run (not the set-up's compile)
            events.append(f"warm:{id(kv)}")
        return compile_(self, lengths, kv)

    monkeypatch.setattr(ss.Session, "_compile", compiled)
    monkeypatch.setattr(rs, "touch_pages", lambda ranges: events.append("read") or touch(ranges))
    monkeypatch.setattr(ss, "trim_heap", lambda: events.append("trim"))
    s = ss.Session(_Worker(), _setup(llama_tiny, serving))  # type: ignore[arg-type]
    s.load()
    warms = [i for i, e in enumerate(events) if e.startswith("warm:")]
    read = events.index("read")
    if serving:
        assert len(warms) == 2, events  # both slots' caches
        assert max(warms) < read, events  # before any weight page is read
        assert warms[-1] < events.index("trim") < read, events
    else:  # `primasim run` keeps its order (other studies' memory figures were measured with it)
        assert len(warms) == 1 and warms[0] > read and "trim" not in events, events
    assert len(s.spare_kv) == 2


def test_load_s_spans_the_warm_up_so_a_workers_set_up_counts_it_once(llama_tiny: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """LOAD's `load_s` covers its warm-up (`warm_s`): `worker_setup_s` (what the serve validation's
    start-up model is fitted on) is SETUP's compile + LOAD, not + the warm-up again. Summing all three
    predicted the emulated desktop's restart at 33.2 s where it took 22.1 s (2026-12-07)."""
    import time

    from primasim.serve.engine import worker_setup_s

    compile_ = ss.Session._compile

    def slow_warm(self: ss.Session, lengths: list[int], kv: Any = None) -> Any:
        if kv is not None:  # a warm-up run: make it dominate LOAD
            time.sleep(0.3)
        return compile_(self, lengths, kv)

    monkeypatch.setattr(ss.Session, "_compile", slow_warm)
    s = ss.Session(_Worker(), _setup(llama_tiny, True))  # type: ignore[arg-type]
    info = s.load()
    assert info["warm_s"] >= 0.6  # both slots
    assert info["load_s"] >= info["warm_s"]
    whole = {**info, "setup_warmup_s": s.warmup_s}
    assert worker_setup_s(whole) == pytest.approx(s.warmup_s + info["load_s"])
    assert worker_setup_s(whole) < s.warmup_s + info["load_s"] + info["warm_s"] - 0.5
