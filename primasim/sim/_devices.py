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

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from primasim.core.device import DeviceSpec
from primasim.core.model import ModelSpec

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
                 recorder: Recorder, fault_efficiency: float = 1.0, roofline: bool = False) -> None:
        self.env = env
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.rec = recorder
        self.timing = DeviceTiming(spec, model, roofline=roofline)
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
        # the kernel's readahead on a mapping with the default advice (set_file_layout): the file's
        # chunks in file order -- this device's and its neighbours' -- and the readahead marks
        self.file_order: list[int] = []
        self.file_pos: dict[int, int] = {}
        self.ra_chunks = 0
        self.ra_marks: dict[int, int] = {}  # chunk with PG_readahead -> file index where its window ends
        self.stall = 0.0  # seconds compute spent waiting for page-fault reads
        self._done_ev: simpy.Event | None = None
        # extension point: seconds a read of `nbytes` takes when the disk grants it at `start`
        # (sim/_runtime.py plugs in a blk-throttle bucket); None = the OS's fault / prefetch rate
        self.disk_time: Callable[[float, float, int], float] | None = None
        # the kernel's own work for each byte a fault or its readahead brings in (allocating and
        # charging the page -- reclaiming another under a memory limit -- submitting the read,
        # mapping it), done in the faulting thread: profiled seconds per byte (0 = not modelled;
        # sim/_runtime.py sets it for lru devices), charged to the compute that faulted
        self.fault_cpu_per_byte = 0.0
        self._fault_bytes_owed = 0.0

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
            # the OS's available memory (not the profiler's reported share of it) less what the
            # process pins; other processes' idle memory can make more room (see PageCache)
            anon_ws = d.anon_other_bytes if d.swap_avail > 0 else 0.0
            self.cache = PageCache(os=d.os, capacity=d.os_avail - anon, swappable=d.os_swappable,
                                   metal=d.has_metal, anon_ws=anon_ws)

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

    def set_file_layout(self, order: list[int], chunk_bytes: float) -> None:
        """The weight file in chunks, in file order (chunks of other devices' layers and of the
        embedding registered too, never computed with here): page faults then read around the
        faulting chunk and a sequential scan reads ahead of itself, as Linux does on a mapping with
        the default advice (`DeviceSpec.read_ahead`; mm/filemap.c do_sync_mmap_readahead,
        mm/readahead.c page_cache_async_ra):

        - a fault reads `read_ahead` bytes around the faulting page, half of them behind it
          (ra.start = index - ra_pages / 2, ra.size = ra_pages), and waits for its own page: the
          bytes behind it are read first. The page a quarter from the window's end is marked
          (PG_readahead, async_size = ra_pages / 4);
        - touching a marked page reads the next `read_ahead` bytes in the background and marks the
          first of them (async_size = size): a scan keeps up to two windows ahead of itself;
        - pages that are already in memory are skipped, and a mark is set only on a page this
          read brings in.

        Bytes that lie outside the device's layers (its neighbours' in the file) are read, fill the
        page cache unaccessed and go first when reclaim needs room; pages read ahead of a scan that
        reclaim takes before the scan reaches them are faulted in again."""
        self.file_order = list(order)
        self.file_pos = {c: i for i, c in enumerate(order)}
        self.ra_chunks = max(0, round(self.spec.read_ahead / chunk_bytes)) if chunk_bytes > 0 else 0

    def map_file(self, model: ModelSpec, own: set[int], chunk: float, *, head: bool, base: int) -> None:
        """Lay the whole weight file out for readahead (set_file_layout): embedding, blocks and
        output layer in file order, this device's registered chunks where they are and the other
        devices' parts as chunks of about `chunk` bytes (ids from `base`) it never computes with;
        each block its own bytes (`ModelSpec.block_bytes`: a mixed quantisation's blocks differ)."""
        assert self.cache is not None
        parts: list[tuple[float, list[int] | None]] = [(float(model.input_bytes), None)]
        parts += [(model.block_bytes(i), self.weights.chunks[i] if i in own else None) for i in range(model.n_layers)]
        parts.append((float(model.output_bytes), self.weights.output_chunks if head else None))
        file: list[int] = []
        for nbytes, ids in parts:
            if ids is None:  # another device's part of the file
                k = max(1, round(nbytes / chunk))
                ids = list(range(base, base + k))
                for c in ids:
                    self.cache.register(c, nbytes / k)
                base += k
            file += ids
        self.set_file_layout(file, chunk)

    def _read_window(self, start: int, end: int, *, demand: int | None, mark: int | None, ra_end: int,
                     token: int) -> None:
        """Read the file's chunks [start, end) that are not in memory, in file order; `demand`: the
        faulting chunk (its read is the fault), `mark`: the index that gets PG_readahead."""
        pc = self.cache
        assert pc is not None
        for j in range(start, end):
            c = self.file_order[j]
            if c in self.loading or pc.resident(c):
                continue
            pc.admit(c, demand=c == demand)
            self._fault_bytes_owed += pc.size[c]
            self.ra_marks.pop(c, None)
            if j == mark:
                self.ra_marks[c] = ra_end
            ev = self.loading[c] = self.env.event()
            if c == demand:
                self.rec.add(self.name, "page_faults", 1)
            self.env.process(self._fault_read(c, ev, token, "page fault" if c == demand else "readahead"))

    def _fault_read(self, cid: int, ev: simpy.Event, token: int, name: str) -> Proc:
        pc = self.cache
        assert pc is not None
        yield from self.read(pc.size[cid], priority=DEMAND, name=name, token=token)
        pc.unlock(cid)
        del self.loading[cid]
        ev.succeed()
        self._notify_read_done()

    def access(self, cid: int, *, token: int = -1) -> None:
        """Compute read a resident chunk: sets its accessed bit; a readahead mark on it starts
        the next window's read (see set_file_layout)."""
        pc = self.cache
        assert pc is not None
        pc.touch(cid)
        end = self.ra_marks.pop(cid, None)
        if end is not None and self.ra_chunks:
            nxt = min(len(self.file_order), end + self.ra_chunks)
            self._read_window(end, nxt, demand=None, mark=end, ra_end=nxt, token=token)

    # ---------------------------------------------------------------- disk
    def read(self, nbytes: float, *, priority: int, name: str = "read", token: int = -1) -> Proc:
        """Read `nbytes` from the disk: a demand fault at the OS's fault rate (Linux's sequential
        readahead, random page-ins elsewhere), a prefetch as madvise's large sequential reads."""
        t0 = self.env.now
        req = self.disk.acquire(priority)
        yield req
        try:
            if self.disk_time is not None:  # evaluated when the disk grants the read (a throttle's slices)
                t = self.disk_time(self.env.now, nbytes, priority)
            elif priority == DEMAND:
                t = self.timing.fault_read(nbytes)
            else:
                t = self.timing.prefetch_read(nbytes)
            yield from self.disk.work(t / (self.fault_efficiency if priority == DEMAND else 1.0))
        finally:
            self.disk.release(req)
        self.disk_bytes += nbytes
        self.rec.add(self.name, "disk_read_bytes", nbytes)
        self.rec.span(self.name, "disk" if priority == DEMAND else "prefetch", t0, self.env.now, name,
                      token=token, nbytes=nbytes)

    def fault(self, cid: int, *, token: int = -1) -> simpy.Event:
        """Start a demand fault for chunk `cid` (or join the read already in flight) and return the
        event of its arrival; the caller has touched the resident chunks it needs first."""
        pc = self.cache
        assert pc is not None
        ev = self.loading.get(cid)
        if ev is not None:
            return ev
        if self.ra_chunks and cid in self.file_pos:  # the kernel reads around the faulting page
            i, ra = self.file_pos[cid], self.ra_chunks
            start = max(0, i - ra // 2)
            end = min(len(self.file_order), start + ra)
            self._read_window(start, end, demand=cid, mark=end - max(1, ra // 4), ra_end=end, token=token)
            return self.loading[cid]
        pc.admit(cid, demand=True)  # the faulting access is this chunk's first reference
        ev = self.loading[cid] = self.env.event()
        self.rec.add(self.name, "page_faults", 1)

        def proc() -> Proc:
            yield from self.read(pc.size[cid], priority=DEMAND, name="page fault", token=token)
            pc.unlock(cid)
            del self.loading[cid]
            ev.succeed()
            self._notify_read_done()

        self.env.process(proc())
        return ev

    def ensure(self, cid: int, *, token: int = -1) -> Proc:
        """Make chunk `cid` resident (a page fault if it is not), then count the access."""
        pc = self.cache
        assert pc is not None
        t0 = self.env.now
        while self.needs_fault(cid):
            yield self.fault(cid, token=token)
        self.access(cid, token=token)
        self._stalled(t0, token)

    def fault_cpu(self) -> float:
        """Profiled CPU seconds of kernel work owed for the bytes faults and their readahead
        brought in since the last call (`fault_cpu_per_byte`)."""
        owed, self._fault_bytes_owed = self._fault_bytes_owed, 0.0
        return owed * self.fault_cpu_per_byte

    def _stalled(self, t0: float, token: int) -> None:
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
        nothing else is left to evict, the submitter waits for the next read to complete.

        Where the kernel's readahead is modelled (`set_file_layout`), Linux's WILLNEED works in
        pieces of the readahead window (force_page_cache_ra: max(ra_pages, io_pages) per call), and a
        piece's reads complete (a throttle's burst, a fast disk) before the next piece makes its
        room: so the next pieces evict the window's first pages -- read, unlocked, not yet touched --
        while the previous window's pages, touched, get reclaim's second look. The model admits the
        next piece once the last one is read (the disk serves them in order either way). Traced on
        the runtime (results/lru_trace.md): a laptop's WILLNEED read its whole next window, which
        then faulted once and read 14 MB more while computing; predicted without the pieces 0.1
        faults a token and the window prefetch rows 32-37 % too fast (docs/validate.md)."""
        pc = self.cache
        assert pc is not None
        piece: list[simpy.Event] = []
        for cid in cids:
            if self.ra_chunks and len(piece) >= self.ra_chunks:  # the next piece (docstring)
                yield self.env.all_of(piece)
                piece = []
            while not (cid in self.loading or pc.resident(cid) or pc.can_admit(cid)):
                yield self._read_done()
            if cid in self.loading or pc.resident(cid):  # (a fault may have read it meanwhile)
                continue
            pc.admit(cid, demand=False)
            ev = self.loading[cid] = self.env.event()
            piece.append(ev)
            self.env.process(self._prefetch_read(cid, ev, token))

    def _prefetch_read(self, cid: int, ev: simpy.Event, token: int) -> Proc:
        pc = self.cache
        assert pc is not None
        yield from self.read(pc.size[cid], priority=PREFETCH, name="prefetch", token=token)
        pc.unlock(cid)
        del self.loading[cid]
        ev.succeed()
        self._notify_read_done()

    def _notify_read_done(self) -> None:
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
        """Compute `layers` on `server` (held throughout); `tail` seconds of other work (e.g.
        serialising the result) follow in the same hold.

        A layer whose weights are not all resident faults the missing chunks in together, as the
        engine's threads do on their rows of a tensor (the disk serves them in order), and
        computes each chunk's share as soon as that chunk is in: a fault waits only for what is
        missing, and compute overlaps the reads still queued behind it."""
        if self.ra_chunks:
            yield from self._run_layers_scan(server, layers, t_layer, name=name, seq=seq, token=token, tail=tail,
                                             tail_name=tail_name)
            return
        req = server.acquire()
        yield req
        try:
            acc = 0.0
            chunks = self.weights.chunks
            pc = self.cache
            for layer in layers:
                cids = chunks.get(layer, ())
                missing = [c for c in cids if self.needs_fault(c)]
                if not missing:
                    for c in cids:
                        pc.touch(c)  # type: ignore[union-attr]
                    acc += t_layer
                else:
                    if acc > 0:
                        yield from server.work(acc, name=name, seq=seq, token=token)
                        acc = 0.0
                    for c in cids:
                        if c not in missing:
                            pc.touch(c)  # type: ignore[union-attr]
                    for c in missing:
                        self.fault(c, token=token)
                    share = t_layer / len(cids)
                    for c in cids:
                        if c in missing:
                            t0 = self.env.now
                            while self.needs_fault(c):  # (evicted again before use: fault anew)
                                yield self.fault(c, token=token)
                            pc.touch(c)  # type: ignore[union-attr]
                            self._stalled(t0, token)
                        yield from server.work(share, name=name, seq=seq, token=token)
                if self.loading and acc > 0:
                    # a background read is running on this device: advance layer by layer so
                    # its evictions see the true order of accesses
                    yield from server.work(acc, name=name, seq=seq, token=token)
                    acc = 0.0
            yield from self._finish(server, acc, tail, name=name, tail_name=tail_name, seq=seq, token=token)
        finally:
            server.release(req)

    @staticmethod
    def _finish(server: Server, acc: float, tail: float, *, name: str, tail_name: str, seq: int,
                token: int) -> Proc:
        """The compute still owed after a window's last layer, then its tail (e.g. the output layer)."""
        if acc > 0:
            yield from server.work(acc, name=name, seq=seq, token=token)
        if tail > 0:
            yield from server.work(tail, name=tail_name, seq=seq, token=token)

    def _run_layers_scan(self, server: Server, layers: list[int], t_layer: float, *, name: str, seq: int,
                         token: int, tail: float, tail_name: str) -> Proc:
        """run_layers on a device whose faults read ahead (set_file_layout): one thread scans each
        layer's chunks in order, faulting where one is missing; the kernel's readahead, not
        concurrent faults, brings in what follows."""
        req = server.acquire()
        yield req
        try:
            acc = 0.0
            for layer in layers:
                cids = self.weights.chunks.get(layer, ())
                share = t_layer / max(1, len(cids))
                for c in cids:
                    if acc > 0 and self.needs_fault(c):  # the compute owed so far runs before the fault
                        yield from server.work(acc, name=name, seq=seq, token=token)
                        acc = 0.0
                    yield from self.ensure(c, token=token)
                    acc += share + self.fault_cpu()
                if self.loading and acc > 0:  # reads in flight: let their evictions see the order
                    yield from server.work(acc, name=name, seq=seq, token=token)
                    acc = 0.0
            yield from self._finish(server, acc, tail, name=name, tail_name=tail_name, seq=seq, token=token)
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
            yield from server.work(t + self.fault_cpu(), name=name, seq=seq, token=token)
        finally:
            server.release(req)

    def sample_residency(self) -> None:
        if self.cache is not None:
            self.rec.sample(self.name, "resident_bytes", self.env.now, self.cache.used)
