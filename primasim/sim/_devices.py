"""A simulated device: CPU, GPU, disk and PCIe servers, RAM with anonymous and file-backed pages.

- CPU and GPU are one server each (a device runs one compute graph at a time; llama.cpp's threads
  act together). Work on them is timed by `DeviceTiming`.
- The disk is a priority server: demand page faults (priority 0) go before prefetch reads
  (priority 1); both read at the OS's throughput (Linux sequential, macOS random), demand faults
  at `fault_efficiency` of it (small synchronous readahead windows).
- RAM holds anonymous memory (KV cache, compute buffers, pinned weights: never reclaimed) and the
  page cache of mmap'd weights (`PageCache`, reclaimed under pressure by the OS's policy).
- A page fault stalls the compute that touched the chunk until its bytes are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from .._device import DeviceSpec
from .._model import ModelSpec
from ._engine import Proc, Recorder, Server
from ._pagecache import PageCache
from ._timing import DeviceTiming

DEMAND, PREFETCH = 0, 1


@dataclass
class Weights:
    """Where one device's weights live: chunk ids per layer that go through the page cache."""

    chunks: dict[int, list[int]] = field(default_factory=dict)  # layer -> chunk ids (mmap only)
    output_chunks: list[int] = field(default_factory=list)


class SimDevice:
    """One device of the cluster inside a SimPy environment."""

    def __init__(self, env: simpy.Environment, spec: DeviceSpec, model: ModelSpec, *,
                 recorder: Recorder, fault_efficiency: float = 1.0) -> None:
        self.env = env
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.rec = recorder
        self.timing = DeviceTiming(spec, model)
        self.fault_efficiency = fault_efficiency
        self.cpu = Server(env, device=self.name, resource="cpu", recorder=recorder)
        self.gpu = Server(env, device=self.name, resource="gpu", recorder=recorder) if spec.gpu else None
        self.disk = Server(env, device=self.name, resource="disk", priority=True, recorder=None)
        self.pcie = Server(env, device=self.name, resource="pcie", recorder=recorder)
        self.cache: PageCache | None = None
        self.weights = Weights()
        self.anon = 0.0
        self.loading: dict[int, simpy.Event] = {}
        self.disk_bytes = 0.0
        self.stall = 0.0  # seconds compute spent waiting for page-fault reads
        self._done_ev: simpy.Event | None = None

    # ---------------------------------------------------------------- memory
    def setup_memory(self, anon: float, *, mmap: bool) -> None:
        """Reserve `anon` bytes (KV, buffers, pinned weights); the rest of RAM is page cache."""
        d = self.spec
        self.anon = anon
        self.rec.set(self.name, "mem_total", d.ram_total)
        self.rec.set(self.name, "mem_avail_before", d.ram_avail)
        self.rec.set(self.name, "mem_avail_min", d.ram_avail - anon)
        self.rec.set(self.name, "anon_bytes", anon)
        if mmap:
            swappable = min(d.can_swap, d.swap_avail)
            self.cache = PageCache(os=d.os, capacity=d.ram_avail - anon, swappable=swappable,
                                   metal=d.has_metal)

    def register_chunks(self, layer: int, nbytes: float, n_chunks: int, *, metal: bool, base: int) -> list[int]:
        assert self.cache is not None
        ids = [base + j for j in range(n_chunks)]
        for c in ids:
            self.cache.register(c, nbytes / n_chunks, metal=metal)
        if layer >= 0:
            self.weights.chunks[layer] = ids
        else:
            self.weights.output_chunks = ids
        return ids

    # ---------------------------------------------------------------- disk
    def read(self, nbytes: float, *, priority: int, name: str = "read", token: int = -1) -> Proc:
        eff = self.fault_efficiency if priority == DEMAND else 1.0
        t0 = self.env.now
        yield from self.disk.serve(self.timing.disk_read(nbytes, eff), priority=priority)
        self.disk_bytes += nbytes
        self.rec.add(self.name, "disk_read_bytes", nbytes)
        self.rec.span(self.name, "disk" if priority == DEMAND else "prefetch", t0, self.env.now, name,
                      token=token, nbytes=nbytes)

    def ensure(self, cid: int, *, token: int = -1) -> Proc:
        """Make chunk `cid` resident (a page fault if it is not), then count the access."""
        pc = self.cache
        assert pc is not None
        t0 = self.env.now
        faulted = False
        while True:
            ev = self.loading.get(cid)
            if ev is not None:
                yield ev  # a read (prefetch or another fault) is already in flight
                continue
            if pc.resident(cid):
                break
            pc.admit(cid, demand=True)  # the faulting access is this chunk's first reference
            faulted = True
            ev = self.loading[cid] = self.env.event()
            self.rec.add(self.name, "page_faults", 1)
            yield from self.read(pc.size[cid], priority=DEMAND, name="page fault", token=token)
            pc.unlock(cid)
            del self.loading[cid]
            ev.succeed()
            break
        if not faulted:
            pc.touch(cid)
        stall = self.env.now - t0
        if stall > 0:
            # compute waited for these bytes: the part of disk time prefetching did not hide
            self.stall += stall
            self.rec.add(self.name, "stall_s", stall)
            self.rec.span(self.name, "wait", t0, self.env.now, "page fault", token=token)

    def needs_fault(self, cid: int) -> bool:
        pc = self.cache
        return pc is not None and (cid in self.loading or not pc.resident(cid))

    def prefetch(self, cids: list[int], *, token: int = -1) -> Proc:
        """madvise(WILLNEED) of a window: the kernel allocates page-cache pages for the whole range
        at once and queues their reads (Linux force_page_cache_readahead and XNU vm_map_willneed
        submit the range asynchronously), which then complete in order at the disk's rate.

        Allocation makes room like any other allocation, evicting unlocked pages -- which, when the
        window is larger than memory, are the window's own pages that were read a moment ago and
        not used yet (the prefetch-release conflict). Pages with a read in flight are locked; when
        nothing else is left to evict, the submitter waits for the next read to complete."""
        pc = self.cache
        assert pc is not None
        for cid in cids:
            if cid in self.loading or pc.resident(cid):
                continue
            while not pc.can_admit(cid):
                yield self._read_done()
            pc.admit(cid, demand=False)
            ev = self.loading[cid] = self.env.event()
            self.env.process(self._prefetch_read(cid, ev, token))

    def _prefetch_read(self, cid: int, ev: simpy.Event, token: int) -> Proc:
        pc = self.cache
        assert pc is not None
        yield from self.read(pc.size[cid], priority=PREFETCH, name="prefetch", token=token)
        pc.unlock(cid)
        del self.loading[cid]
        ev.succeed()
        done, self._done_ev = self._done_ev, None
        if done is not None:
            done.succeed()

    def _read_done(self) -> simpy.Event:
        """An event that fires when the next background read completes."""
        if self._done_ev is None:
            self._done_ev = self.env.event()
        return self._done_ev

    # ---------------------------------------------------------------- compute
    def run_layers(self, server: Server, layers: list[int], t_layer: float, *, name: str,
                   seq: int = 0, token: int = -1, tail: float = 0.0, tail_name: str = "") -> Proc:
        """Compute `layers` on `server` (held throughout), faulting in non-resident chunks first;
        `tail` seconds of other work (e.g. serialising the result) follow in the same hold."""
        req = server.acquire()
        yield req
        try:
            acc = 0.0
            chunks = self.weights.chunks
            for layer in layers:
                for cid in chunks.get(layer, ()):
                    if self.needs_fault(cid):
                        if acc > 0:
                            yield from server.work(acc, name=name, seq=seq, token=token)
                            acc = 0.0
                        yield from self.ensure(cid, token=token)
                    else:
                        self.cache.touch(cid)  # type: ignore[union-attr]
                acc += t_layer
                if self.loading:
                    # a background read is running on this device: advance layer by layer so
                    # its evictions see the true order of accesses
                    yield from server.work(acc, name=name, seq=seq, token=token)
                    acc = 0.0
            if acc > 0:
                yield from server.work(acc, name=name, seq=seq, token=token)
            if tail > 0:
                yield from server.work(tail, name=tail_name, seq=seq, token=token)
        finally:
            server.release(req)

    def run_chunks(self, server: Server, cids: list[int], t: float, *, name: str, seq: int = 0,
                   token: int = -1) -> Proc:
        """Compute `t` seconds of work that reads `cids` (e.g. the output layer)."""
        req = server.acquire()
        yield req
        try:
            for cid in cids:
                yield from self.ensure(cid, token=token)
            yield from server.work(t, name=name, seq=seq, token=token)
        finally:
            server.release(req)

    def sample_residency(self) -> None:
        if self.cache is not None:
            self.rec.sample(self.name, "resident_bytes", self.env.now, self.cache.used)
