"""prima.cpp's cost model as pure functions (SI units: bytes, seconds, FLOP/s).

What is modelled (reference prima-cpp.md §1):
- per-device coefficients alpha (CPU seconds per layer), beta (GPU minus CPU seconds per layer),
  xi (seconds per window: RAM<->VRAM copies and the hop to the next device) and the head-only
  constant kappa;
- the sets M1..M4 (macOS without Metal / macOS with Metal / Linux-Android overloaded, or fits);
- the a/b/c table, so that under L = k*W the token latency is T = k*sum(a*w + b*n + c) + kappa;
- the general form (Eqs. 11-19) for any plan, including a partial last lap;
- predicted memory pressure per device.

Two variants (reference §1.6):
- ``"paper"``: alpha includes the RAM read term b'/T^cpu, beta the VRAM read terms, xi the
  RAM<->VRAM copies of the hidden state, kappa the output layer's own FLOPs and the head's
  (b_i/V + b_o)/T^cpu read; Android devices swap out other apps' pages before dropping mmap'd ones.
- ``"code"``: what prima.cpp's HEAD computes: no memory-read terms, xi = 0, kappa counts *layer*
  FLOPs for the output layer (a bug we keep on purpose), Android is treated as Linux (prima.cpp's
  ``device_os()`` reports Termux as Linux).
``comm=True`` adds the communication time t^comm (one-way latency + 4e bytes / bandwidth of the hop
to the next ring device) to xi in either variant; prima.cpp's code sets it to zero.

Conventions: arrays are indexed in the order of ``cluster.devices`` and the head is
``cluster.head``. l_m / lg_m are the total layers / GPU layers of device m over all laps.

Longer than ~600 lines: the cost model is one set of formulas (prima.cpp's terms per device kind,
its two variants, corrections, the other schedules' estimates) that Halda and the planners read in
one place, so a term cannot drift between two files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from primasim.core.cluster import ClusterSpec, NetworkSpec
from primasim.core.device import DeviceSpec
from primasim.core.errors import SpecError
from primasim.core.model import ModelSpec
from primasim.core.plan import device_memory
from primasim.core.units import GB

if TYPE_CHECKING:
    from primasim.core.plan import Plan

Variant = Literal["code", "paper"]
VARIANTS: tuple[str, ...] = ("code", "paper")
SETS: tuple[str, ...] = ("M1", "M2", "M3", "M4")

#: s^disk_threshold: devices whose disk reads slower than this are put in M4 ("must fit in memory").
DISK_THRESHOLD = 0.1 * GB
#: Positions the attention FLOPs of a decode step are counted at (prima.cpp's profiler counts
#: n_kv = min(n_ctx, max(32, pad32(n_predict))), 256 with flash attention). It is < 5 % of a
#: layer's FLOPs for every catalogue model, so the exact choice barely matters.
FLOPS_POSITIONS = 256


# ----------------------------------------------------------------------------------- corrections
@dataclass(frozen=True)
class DeviceCorrection:
    """Measured (simulated or real) replacements for one device's coefficients.

    Every field is optional; ``None`` keeps the analytic value. SI units.
    - ``cpu_layer_s``: seconds to run one layer on the CPU (replaces alpha_m: compute, KV-cache
      append and memory reads).
    - ``gpu_layer_s``: seconds to run one layer on the GPU (replaces alpha_m + beta_m).
    - ``disk_bps``: effective bytes/s of page-fault reloads (replaces s^disk_m everywhere: in
      a_m, b_m, kappa and the slow-disk test).
    - ``hop_s``: seconds per hop to the next ring device (replaces t^comm_m; counted even when
      ``comm=False``, since it was measured).
    - ``head_s``: seconds of head-only compute per token (output layer, sampling); replaces the
      compute part of kappa. Ignored on non-head devices.
    """

    cpu_layer_s: float | None = None
    gpu_layer_s: float | None = None
    disk_bps: float | None = None
    hop_s: float | None = None
    head_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0 \
                    or (f.name == "disk_bps" and v == 0):
                raise SpecError(f"correction '{f.name}' must be a finite {'positive' if f.name == 'disk_bps' else 'non-negative'} "
                                f"number, got {v!r}", where="corrections", fix=f"give {f.name} in SI units (seconds or bytes/s)")


Corrections = Mapping[str, DeviceCorrection | Mapping[str, float]]


def normalize_corrections(corr: Corrections | None, names: Sequence[str]) -> dict[str, DeviceCorrection]:
    """Validate a corrections mapping (device name -> DeviceCorrection or a dict of its fields)."""
    if not corr:
        return {}
    if not isinstance(corr, Mapping):
        raise SpecError(f"corrections must be a mapping of device name -> correction, got {type(corr).__name__}",
                        where="corrections", fix="pass {'D1': DeviceCorrection(cpu_layer_s=...)}")
    out: dict[str, DeviceCorrection] = {}
    allowed = {f.name for f in fields(DeviceCorrection)}
    for name, c in corr.items():
        if name not in names:
            raise SpecError(f"correction for unknown device {name!r}", where="corrections", fix=f"use one of {list(names)}")
        if isinstance(c, DeviceCorrection):
            out[name] = c
        elif isinstance(c, Mapping):
            bad = set(c) - allowed
            if bad:
                raise SpecError(f"unknown correction field(s) {sorted(bad)} for {name}", where="corrections",
                                fix=f"use {sorted(allowed)}")
            out[name] = DeviceCorrection(**{str(k): v for k, v in c.items()})
        else:
            raise SpecError(f"correction for {name} must be a DeviceCorrection or a dict", where="corrections",
                            fix="pass DeviceCorrection(...)")
    return out


# ----------------------------------------------------------------------------------- model terms
@lru_cache(maxsize=256)
def _model_terms(model: ModelSpec, n_ctx: int) -> dict[str, Any]:
    """Byte and FLOP counts of a model the cost model needs (cached: ModelSpec is frozen)."""
    b = float(model.layer_bytes)
    kv_tok = float(model.kv_bytes_per_token())
    return {
        "b": b,
        "bp": b + kv_tok * n_ctx,  # b'
        "kv_tok": kv_tok,
        "bi_row": float(model.input_bytes) / model.vocab,  # b_i / V: one embedding row
        "bo": float(model.output_bytes),
        "c_cpu": float(model.compute_buffer_bytes(n_ctx)),
        "layer_flops": dict(model.layer_flops_avg(min(n_ctx, FLOPS_POSITIONS))),
        "out_flops": dict(model.output_flops()),
        "hidden_bytes": float(model.hidden_bytes),
        "L": model.n_layers,
    }


def _seconds(flops: Mapping[str, float], rate_of: Any) -> float:
    return float(sum(f / rate_of(q) for q, f in flops.items() if f))


@dataclass(frozen=True)
class Coefficients:
    """prima.cpp's per-device coefficients for one set assignment (arrays in device order, SI).

    Under L = k*W the token latency is ``k * (a @ w + b @ n + c.sum()) + kappa`` (reference §1.4).
    ``z``/``z_gpu`` are the RAM/VRAM constraint vectors of §1.5 (so that ``W*z_m`` is the window a
    device may not exceed, or must exceed, for its set).
    """

    names: tuple[str, ...]
    sets: tuple[str, ...]
    alpha: np.ndarray = field(repr=False)
    beta: np.ndarray = field(repr=False)
    xi: np.ndarray = field(repr=False)
    a: np.ndarray = field(repr=False)
    b: np.ndarray = field(repr=False)
    c: np.ndarray = field(repr=False)
    kappa: float = 0.0
    z: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    z_gpu: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    head: int = 0
    variant: str = "code"

    def tpot(self, w: Sequence[int], n: Sequence[int], k: int) -> float:
        """Closed-form latency k*(a.w + b.n + sum c) + kappa, in seconds."""
        wa, na = np.asarray(w, float), np.asarray(n, float)
        return float(k * (self.a @ wa + self.b @ na + self.c.sum()) + self.kappa)


class CostModel:
    """Everything about (model, devices, network) the cost model needs, precomputed as arrays.

    Internal workhorse of the public functions below and of Halda; build it once, then evaluate
    sets, coefficients and latencies for many (w, n, k).
    """

    def __init__(self, model: ModelSpec, devices: Sequence[DeviceSpec], network: NetworkSpec, head: int, *,
                 n_ctx: int, variant: str = "code", comm: bool = False,
                 corrections: Corrections | None = None) -> None:
        if variant not in VARIANTS:
            raise SpecError(f"unknown cost-model variant {variant!r}", where="variant", fix="use 'code' or 'paper'")
        if n_ctx < 1:
            raise SpecError(f"n_ctx must be >= 1, got {n_ctx}", where="--n-ctx", fix="give a positive context length")
        self.model, self.variant, self.comm, self.n_ctx = model, variant, comm, int(n_ctx)
        self.devices = tuple(devices)
        self.names = tuple(d.name for d in devices)
        self.network = network
        M = len(devices)
        self.M, self.head = M, head
        mt = _model_terms(model, int(n_ctx))
        self.L = mt["L"]
        self.b, self.bp, self.kv_tok = mt["b"], mt["bp"], mt["kv_tok"]
        self.bi_row, self.bo, self.c_cpu = mt["bi_row"], mt["bo"], mt["c_cpu"]
        self.hidden_bytes = mt["hidden_bytes"]
        paper = variant == "paper"
        corr = normalize_corrections(corrections, self.names)
        self.corrections = corr

        f_layer, f_out = mt["layer_flops"], mt["out_flops"]
        z = np.zeros
        self.is_mac = np.array([d.os == "macos" for d in devices])
        self.is_android = np.array([d.os == "android" for d in devices])
        self.has_gpu = np.array([d.gpu is not None for d in devices])
        self.is_metal = np.array([d.has_metal for d in devices])
        self.uma = np.array([bool(d.uma) for d in devices])
        # Android's swap-first behaviour exists only in the paper variant (HEAD sees Termux as Linux).
        self.swap = np.array([min(d.can_swap, d.swap_avail) if (paper and d.os == "android") else 0.0
                              for d in devices])
        self.ram_avail = np.array([d.ram_avail for d in devices])
        self.ram_total = np.array([d.ram_total for d in devices])
        self.vram_avail = np.array([d.gpu.vram_avail if d.gpu else 0.0 for d in devices])
        self.c_gpu = np.array([d.gpu.compute_buffer if d.gpu else 0.0 for d in devices])
        self.disk = np.array([corr[d.name].disk_bps if d.name in corr and corr[d.name].disk_bps else d.disk_speed
                              for d in devices])
        # memory budget each set condition compares with (prima.cpp mem_budget)
        self.budget = np.where(self.is_metal, self.vram_avail, self.ram_avail + self.swap)
        self.bio = z(M)
        self.bio[head] = self.bi_row + self.bo  # (b_i/V + b_o) * I[m = head]
        self.bcio = self.bio + self.c_cpu

        self.t_cpu = np.array([_seconds(f_layer, d.cpu_rate) for d in devices])
        self.t_gpu = np.array([_seconds(f_layer, d.gpu_rate) if d.gpu else 0.0 for d in devices])
        kv_cpu = np.array([d.kv_copy for d in devices])
        kv_gpu = np.array([d.gpu.kv_copy if d.gpu else 0.0 for d in devices])
        alpha = self.t_cpu + kv_cpu
        beta = np.where(self.has_gpu, self.t_gpu - self.t_cpu + kv_gpu - kv_cpu, 0.0)
        if paper:
            read_cpu = self.bp / np.array([d.ram_bw for d in devices])
            read_gpu = np.array([self.bp / d.gpu.mem_bw if d.gpu else 0.0 for d in devices])
            alpha = alpha + read_cpu
            beta = beta + np.where(self.has_gpu, read_gpu - read_cpu, 0.0)
        for i, d in enumerate(devices):
            c = corr.get(d.name)
            if c is None:
                continue
            if c.cpu_layer_s is not None:
                alpha[i] = c.cpu_layer_s
            if c.gpu_layer_s is not None and d.gpu is not None:
                beta[i] = c.gpu_layer_s - alpha[i]
        self.alpha, self.beta = alpha, beta
        # per-token part of a layer (FLOPs + KV append), for passes over several tokens (prefill)
        self.tok_cpu = self.t_cpu + kv_cpu
        self.tok_gpu = np.where(self.has_gpu, self.t_gpu + kv_gpu, 0.0)
        for i, d in enumerate(devices):
            c = corr.get(d.name)
            if c is not None and c.cpu_layer_s is not None:
                self.tok_cpu[i] = c.cpu_layer_s
            if c is not None and c.gpu_layer_s is not None and d.gpu is not None:
                self.tok_gpu[i] = c.gpu_layer_s

        # xi: per window. RAM<->VRAM copies of the 4e-byte hidden state (paper; discrete GPUs only).
        copies = np.array([2 * (d.gpu.copy_latency + self.hidden_bytes / d.gpu.pcie_bw)
                           if (paper and d.gpu is not None and not d.uma) else 0.0 for d in devices])
        self.t_comm = np.zeros(M)
        if M > 1:
            for i, d in enumerate(devices):
                nxt = devices[(i + 1) % M].name
                c = corr.get(d.name)
                if c is not None and c.hop_s is not None:
                    self.t_comm[i] = c.hop_s
                elif comm:
                    self.t_comm[i] = network.transfer_time(d.name, nxt, self.hidden_bytes)
        self.xi = copies + self.t_comm

        hd = devices[head]
        out_flops = f_out if paper else f_layer  # HEAD counts layer FLOPs for the output layer
        head_compute = _seconds(out_flops, hd.cpu_rate)
        if hd.name in corr and corr[hd.name].head_s is not None:
            head_compute = float(corr[hd.name].head_s)  # type: ignore[arg-type]
        if paper:
            head_compute += (self.bi_row + self.bo) / hd.ram_bw
        self.kappa0 = head_compute + self.bi_row / self.disk[head]  # set-independent part of kappa

        # layer capacities (in layers of b' bytes) for the constraint rows, per OS type
        self.cap_fit = np.where(self.is_metal, self.vram_avail - self.bcio - self.c_gpu,
                                self.ram_avail + self.swap - self.bcio) / self.bp
        vram_left = self.vram_avail - self.c_gpu - np.where(self.is_metal & (np.arange(M) == head), self.bo, 0.0)
        self.gpu_cap = np.where(self.has_gpu, np.maximum(vram_left, 0.0) / self.bp, 0.0)
        # whether GPU layers relieve RAM (Linux/Android discrete or UMA-less GPUs; not macOS/Metal)
        self.gpu_relieves_ram = self.has_gpu & ~self.is_mac
        self.slow_disk = self.disk < DISK_THRESHOLD
        # layers whose KV cache (n_ctx positions) fits in the anonymous-memory budget RAM + swap
        kv_layer = self.kv_tok * self.n_ctx
        anon_budget = np.array([d.ram_avail + d.swap_avail for d in devices]) - self.c_cpu \
            - np.where(self.has_gpu & self.uma, self.c_gpu, 0.0)
        self.kv_cap = anon_budget / kv_layer if kv_layer > 0 else np.full(M, np.inf)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def for_cluster(cls, model: ModelSpec, cluster: ClusterSpec, **kw: Any) -> CostModel:
        return cls(model, cluster.devices, cluster.network, cluster.names.index(cluster.head), **kw)

    # ---------------------------------------------------------------- sets
    def sets(self, lt: np.ndarray, lg: np.ndarray, forced: np.ndarray | None = None) -> list[str]:
        """M1..M4 per device for totals lt (layers) and lg (GPU layers), as prima.cpp's assign_sets."""
        lt = np.asarray(lt, float)
        lg = np.asarray(lg, float)
        need_all = lt * self.bp + self.bio + self.c_cpu  # cond1 LHS
        cond1 = need_all > self.budget
        cond2 = need_all + self.c_gpu > self.budget
        cond3 = (lt - lg) * self.bp + self.bio + self.c_cpu > self.budget
        out = []
        for m in range(self.M):
            if (forced is not None and forced[m]) or self.slow_disk[m]:
                out.append("M4")
            elif self.is_mac[m] and not self.is_metal[m] and cond1[m]:
                out.append("M1")
            elif self.is_metal[m] and cond2[m]:
                out.append("M2")
            elif not self.is_mac[m] and cond3[m]:
                out.append("M3")
            else:
                out.append("M4")
        return out

    # ---------------------------------------------------------------- coefficients
    def coefficients(self, sets: Sequence[str]) -> Coefficients:
        M, bp, b, s = self.M, self.bp, self.b, self.disk
        if len(sets) != M or any(x not in SETS for x in sets):
            raise SpecError(f"sets must list one of {SETS} per device ({M}), got {list(sets)}", where="sets",
                            fix="use device_sets() to compute them")
        S = np.array(list(sets))
        m1, m2, m3, m4 = (S == "M1"), (S == "M2"), (S == "M3"), (S == "M4")
        a = self.alpha + np.where(m1 | m3, bp / s, 0.0) + np.where(m2, b / s, 0.0)
        bb = np.where(m1, 0.0, self.beta) - np.where(m3 & self.has_gpu, bp / s, 0.0)
        bb = np.where(self.has_gpu, bb, 0.0)
        h = self.head
        kappa = self.kappa0 + (self.bo / s[h] if not m4[h] else 0.0)
        kappa += float(np.sum(np.where(m1 | m3, (self.c_cpu - self.ram_avail - self.swap) / s, 0.0)))
        L = self.L
        zz = np.where(m1, (self.ram_avail - self.bcio) / (L * bp), 0.0)
        zz = np.where(m2, (self.vram_avail - self.bcio - self.c_gpu) / (L * bp), zz)
        zz = np.where(m3, (self.ram_avail + self.swap - self.bcio) / (L * bp), zz)
        zz = np.where(m4, -self.cap_fit / L, zz)
        return Coefficients(self.names, tuple(sets), self.alpha.copy(), self.beta.copy(), self.xi.copy(), a, bb,
                            self.xi.copy(), float(kappa), zz, self.gpu_cap / L, h, self.variant)

    def rows(self, sets: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Constraint rows of a set assignment in total-layer units.

        Returns (g_lo, D_lo, g_up, D_up): device m must satisfy lt - g_lo*lg >= D_lo (M1-M3, "must
        overload") and lt - g_up*lg <= D_up (M4, "must fit"); inactive rows are +-inf.
        """
        S = np.array(list(sets))
        over = S != "M4"
        g_lo = np.where((S == "M3") & self.has_gpu, 1.0, 0.0)
        cap_over = np.where(S == "M1", (self.ram_avail - self.bcio) / self.bp,
                            np.where(S == "M2", (self.vram_avail - self.bcio - self.c_gpu) / self.bp,
                                     (self.ram_avail + self.swap - self.bcio) / self.bp))
        D_lo = np.where(over, cap_over, -np.inf)
        g_up = np.where(~over & self.gpu_relieves_ram, 1.0, 0.0)
        D_up = np.where(~over, self.cap_fit, np.inf)
        # Beyond prima.cpp: the KV cache and compute buffers are anonymous memory that cannot be
        # evicted, so they must fit in RAM + swap on every device (else the plan OOMs). Same shape
        # as the M4 row (GPU-resident KV lives in VRAM on discrete GPUs), so M4 takes the minimum.
        kv_g = np.where(self.has_gpu & ~self.uma, 1.0, 0.0)
        D_kv = self.kv_cap
        D_up = np.where(over, D_kv, np.minimum(D_up, D_kv))
        g_up = np.where(over, kv_g, g_up)
        return g_lo, D_lo, g_up, D_up

    # ---------------------------------------------------------------- latency
    def device_times(self, lt: np.ndarray, lg: np.ndarray, windows: np.ndarray, *, pinned: bool = False,
                     n_tokens: int = 1, sets_cost: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per-device (compute+memory, disk, comm) seconds for one pass of `n_tokens` tokens.

        With ``sets_cost=None`` the disk term is the general form's actual overflow (Eqs. 15-18);
        slow disks are *not* excused. With a set assignment it is the closed form of those sets.
        """
        lt = np.asarray(lt, float)
        lg = np.asarray(lg, float)
        windows = np.asarray(windows, float)
        # compute + KV append + (paper) memory reads; FLOP terms scale with the tokens in the pass
        comp = (lt - lg) * self.alpha + lg * (self.alpha + self.beta)
        if n_tokens != 1:
            # more tokens in one pass: FLOPs and KV appends scale, weight reads do not
            extra = (lt - lg) * self.tok_cpu + lg * self.tok_gpu
            comp = comp + (n_tokens - 1) * extra
        s = self.disk
        if pinned:
            disk = np.zeros(self.M)
        elif sets_cost is None:
            over = (lt - lg) * self.bp + self.bio + self.c_cpu - self.budget
            metal_over = lt * self.bp + self.bio + self.c_cpu + self.c_gpu > self.budget
            disk = np.where(self.is_metal, np.where(metal_over, (lt * self.b + self.bio) / s, 0.0),
                            np.maximum(over, 0.0) / s)
            # the head reads one embedding row per token; when it overflows, that row and b_o are
            # already inside the overflow (closed form: kappa's b_i/(V s) + b_o/s terms)
            h = self.head
            if disk[h] == 0:
                disk[h] = self.bi_row / s[h]
        else:
            S = np.array(list(sets_cost))
            m1, m2, m3 = S == "M1", S == "M2", S == "M3"
            disk = np.where(m1, (lt * self.bp + self.bio + self.c_cpu - self.ram_avail) / s, 0.0)
            disk = np.where(m2, (lt * self.b + self.bio) / s, disk)
            disk = np.where(m3, ((lt - lg) * self.bp + self.bio + self.c_cpu - self.ram_avail - self.swap) / s, disk)
            h = self.head
            if S[h] == "M4":
                disk[h] += self.bi_row / s[h]
        comm = windows * (self.xi + (n_tokens - 1) * self._comm_extra_bytes_time())
        return {"compute": comp, "disk": disk, "comm": comm}

    def _comm_extra_bytes_time(self) -> np.ndarray:
        """Seconds one more token's hidden state adds to a hop (bandwidth part only)."""
        if self.M == 1 or not (self.comm or any(c.hop_s is not None for c in self.corrections.values())):
            return np.zeros(self.M)
        out = np.zeros(self.M)
        for i, d in enumerate(self.devices):
            if self.t_comm[i] > 0:
                bw, _ = self.network.link(d.name, self.devices[(i + 1) % self.M].name)
                out[i] = self.hidden_bytes / bw
        return out

    def cost_grid(self, m: int, lt: np.ndarray, lg: np.ndarray, windows: float | np.ndarray, *,
                  priority: float = 1.0) -> np.ndarray:
        """Device m's exact share of the TPOT for totals (lt, lg) (broadcast arrays), +inf where the
        plan would be invalid: GPU layers beyond VRAM, KV cache beyond RAM + swap, or a slow-disk
        device that does not fit in memory (prima.cpp keeps those in M4). The disk term is the true
        piecewise one (max(0, overflow) / s, or Metal's all-or-nothing reload), i.e. the union of
        the four sets' closed forms. The head's share excludes the constant ``head_time()``; its
        layer cost (compute + disk) is divided by ``priority`` (prima.cpp's master priority).
        """
        lt = np.asarray(lt, float)
        lg = np.asarray(lg, float)
        s = self.disk[m]
        ok = (lg <= lt) & (lg <= math.floor(self.gpu_cap[m] + 1e-7)) & (lg >= 0)
        kv_g = 1.0 if (self.has_gpu[m] and not self.uma[m]) else 0.0
        ok &= lt - kv_g * lg <= self.kv_cap[m] + 1e-7
        if self.is_metal[m]:
            over_b = lt * self.bp + self.bcio[m] + self.c_gpu[m] - self.budget[m]
            overloaded = over_b > 0
            disk = np.where(overloaded, (lt * self.b + self.bio[m]) / s, 0.0)
        else:
            cpu_l = lt - (lg if not self.is_mac[m] else 0.0)
            over_b = cpu_l * self.bp + self.bcio[m] - self.budget[m]
            overloaded = over_b > 0
            disk = np.maximum(over_b, 0.0) / s
        if self.slow_disk[m]:
            ok &= ~overloaded
        if m == self.head:
            disk = disk + np.where(overloaded, 0.0, self.bi_row / s)
        layer = self.alpha[m] * lt + disk
        if m == self.head:
            layer = layer / priority
        cost = layer + self.beta[m] * lg + self.xi[m] * windows
        return np.where(ok, cost, np.inf)

    def head_time(self, n_tokens: int = 1) -> float:
        """Head-only seconds per pass not in device_times: output layer (+ its reads)."""
        return self.kappa0 - self.bi_row / self.disk[self.head]

    def tpot(self, lt: np.ndarray, lg: np.ndarray, windows: np.ndarray, *, pinned: bool = False,
             sets_cost: Sequence[str] | None = None) -> float:
        t = self.device_times(lt, lg, windows, pinned=pinned, sets_cost=sets_cost)
        return float(t["compute"].sum() + t["disk"].sum() + t["comm"].sum() + self.head_time())


# ----------------------------------------------------------------------------------- helpers
def totals_of(w: Sequence[int], n: Sequence[int], L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lt, lg, windows) per device for windows w and GPU layers n (general form, Appendix A.3).

    Devices in ring order; the last lap is partial when L is not a multiple of W = sum(w).
    """
    wa = np.asarray(w, dtype=np.int64)
    na = np.asarray(n, dtype=np.int64)
    W = int(wa.sum())
    if W <= 0:
        z = np.zeros(len(wa), dtype=np.int64)
        return z, z.copy(), z.copy()
    q, R = divmod(L, W)
    before = np.concatenate([[0], np.cumsum(wa)[:-1]])
    part = np.minimum(wa, np.maximum(0, R - before))
    lt = q * wa + part
    lg = q * na + np.minimum(na, part)
    windows = q + (part > 0).astype(np.int64)
    windows = np.where(wa > 0, windows, 0)
    return lt, lg, windows


def device_sets(model: ModelSpec, cluster: ClusterSpec, w: Sequence[int], n: Sequence[int], k: int, *,
                n_ctx: int, forced_m4: frozenset[str] | set[str] = frozenset(), variant: Variant = "code") -> list[str]:
    """prima.cpp's set assignment ("M1".."M4" per device of `cluster.devices`) for windows w, GPU
    layers n and k laps. When L = k*sum(w) this is exactly HEAD's ``assign_sets``; otherwise the
    totals of the general form are used."""
    cm = CostModel.for_cluster(model, cluster, n_ctx=n_ctx, variant=variant)
    if len(w) != cm.M or len(n) != cm.M:
        raise SpecError(f"w and n need one entry per device ({cm.M})", where="device_sets", fix="pass full vectors")
    wa, na = np.asarray(w, np.int64), np.asarray(n, np.int64)
    if k * int(wa.sum()) == model.n_layers:
        lt, lg = k * wa, k * na
    else:
        lt, lg, _ = totals_of(wa, na, model.n_layers)
    forced = np.array([nm in forced_m4 for nm in cm.names])
    return cm.sets(lt, lg, forced)


def coefficients(model: ModelSpec, cluster: ClusterSpec, sets: Sequence[str], *, n_ctx: int,
                 variant: Variant = "code", comm: bool = False, corrections: Corrections | None = None) -> Coefficients:
    """alpha, beta, xi, the a/b/c table, kappa, z and z_gpu for a set assignment (reference §1.4-1.5)."""
    cm = CostModel.for_cluster(model, cluster, n_ctx=n_ctx, variant=variant, comm=comm, corrections=corrections)
    return cm.coefficients(sets)


def _plan_cost_model(plan: Plan, model: ModelSpec, cluster: ClusterSpec, *, variant: str, comm: bool,
                     corrections: Corrections | None = None) -> tuple[CostModel, list[int]]:
    """A CostModel over the plan's ring (active devices in plan order; the plan head always in)."""
    names = [d.name for d in plan.devices if d.layers > 0 or d.name == plan.head]
    devs = [cluster.device(nm) for nm in names]
    idx = [i for i, d in enumerate(plan.devices) if d.name in names]
    corr = {k: v for k, v in (corrections or {}).items() if k in names}
    cm = CostModel(model, devs, cluster.network, 0, n_ctx=plan.n_ctx, variant=variant, comm=comm, corrections=corr)
    return cm, idx


def _ring_totals(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tot = plan.totals()
    win = plan.n_windows()
    names = [d.name for d in plan.devices if d.layers > 0 or d.name == plan.head]
    lt = np.array([tot[nm][0] for nm in names], float)
    lg = np.array([tot[nm][1] for nm in names], float)
    wm = np.array([win[nm] for nm in names], float)
    return lt, lg, wm


# ----------------------------------------------------------------------------------- predictions
def predict_tpot(plan: Plan, model: ModelSpec, cluster: ClusterSpec, *, variant: Variant = "paper",
                 comm: bool = True, corrections: Corrections | None = None) -> float:
    """Predicted time per output token (seconds) of `plan`, general form (Eqs. 11-19), any W.

    Ring schedules (prima.cpp, exo, llama.cpp, the planners) use the prima.cpp model: the *sum* of
    every device's compute, memory, disk and communication time (no overlap, the paper's worst
    case, so prefetching does not show here: the simulator models it). Disk time is the actual
    overflow of each device's page cache (slow disks are not excused as they are in Halda's sets).
    Pinned weights never reload. Other schedules (tp, rpp, offload, batch) use the analytic
    estimates of :func:`schedule_estimate`.
    """
    if plan.schedule != "ring":
        return schedule_estimate(plan, model, cluster, variant=variant, comm=comm)["tpot"]
    cm, _ = _plan_cost_model(plan, model, cluster, variant=variant, comm=comm, corrections=corrections)
    lt, lg, wm = _ring_totals(plan)
    t = cm.tpot(lt, lg, wm, pinned=plan.weights == "pinned")
    return t + _system_overhead(plan, cm)


def _system_overhead(plan: Plan, cm: CostModel) -> float:
    """Per-token extras a system adds on top of the ring (exo broadcasts each result to every peer)."""
    n_bcast = int(plan.options.get("broadcast_peers", 0))
    if n_bcast and cm.M > 1:
        return n_bcast * cm.network.latency
    return 0.0


def predict_ttft(plan: Plan, model: ModelSpec, cluster: ClusterSpec, *, prompt_tokens: int,
                 variant: Variant = "paper", comm: bool = True, corrections: Corrections | None = None) -> float:
    """Predicted time to first token (seconds): one prefill pass over the prompt.

    Estimate: the TPOT model with every FLOP term (and KV append) multiplied by `prompt_tokens`,
    every hop carrying prompt_tokens x 4e bytes, while weights are read (and, if they do not fit,
    reloaded from disk) once, as in one decode step; the output layer runs for the last position
    only (llama.cpp computes logits for the last prompt token). Page cache warm (the model was
    loaded once before, as in the paper's measurements). Other schedules: :func:`schedule_estimate`.
    """
    P = max(1, int(prompt_tokens))
    if plan.schedule != "ring":
        return schedule_estimate(plan, model, cluster, variant=variant, comm=comm, prompt_tokens=P)["ttft"]
    cm, _ = _plan_cost_model(plan, model, cluster, variant=variant, comm=comm, corrections=corrections)
    lt, lg, wm = _ring_totals(plan)
    t = cm.device_times(lt, lg, wm, pinned=plan.weights == "pinned", n_tokens=P)
    return float(t["compute"].sum() + t["disk"].sum() + t["comm"].sum() + cm.head_time()) + _system_overhead(plan, cm)


def memory_pressure(plan: Plan, model: ModelSpec, cluster: ClusterSpec) -> dict[str, float]:
    """Predicted memory pressure per device: non-reclaimable bytes / total RAM (prima.cpp's metric).

    Counts anonymous memory only: KV cache, compute buffers, pinned weights (exo, dllama, MDI-LLM,
    Bud), and on unified-memory devices the GPU-side KV cache and buffers. mmap'd weights sit in the
    page cache, which the OS can reclaim, so they do not count (why prima.cpp stays < 10 %).
    Discrete-GPU VRAM is not system memory and does not count either.
    """

    mem = device_memory(plan, model, cluster)
    out: dict[str, float] = {}
    extra_kv = float(plan.options.get("kv_reserved_bytes", 0.0)) if plan.schedule == "batch" else 0.0
    for d in plan.devices:
        dev = cluster.device(d.name)
        m = mem[d.name]
        if d.layers == 0 and d.name != plan.head:
            out[d.name] = 0.0
            continue
        anon = m.kv_cpu + m.buffers_cpu
        if plan.weights == "pinned":
            anon += m.weights_cpu
        if dev.uma:
            anon += m.kv_gpu + m.buffers_gpu + (m.weights_gpu if plan.weights == "pinned" else 0.0)
        if d.name == plan.head:
            anon += extra_kv
        out[d.name] = float(anon / dev.ram_total) if dev.ram_total > 0 else 0.0
    return out


# ----------------------------------------------------------------------------------- other schedules
def schedule_estimate(plan: Plan, model: ModelSpec, cluster: ClusterSpec, *, variant: Variant = "paper",
                      comm: bool = True, prompt_tokens: int = 16) -> dict[str, float]:
    """Analytic TPOT/TTFT/throughput (seconds, tokens/s) for the non-ring schedules.

    - ``tp`` (distributed-llama): per layer every device computes 1/N of it, then two all-reduces
      (after attention and after the FFN), each an all-to-all of q80 slices over the network
      (Wi-Fi: one shared medium, so N(N-1) slices queue for the air); the root broadcasts x first
      and gathers logits last (reference D.3).
    - ``rpp`` (MDI-LLM): S sequences circulate; a sequence's token needs one ring trip
      R = sum(stage + hop); with S >= N, the busiest stage bounds throughput (reference C.3):
      TPOT per sequence = max(R, S * max stage), throughput = S / TPOT.
    - ``offload`` (FlexGen, PIPO): per layer the GPU waits for that layer's weights (streamed from
      RAM or disk over PCIe) unless they are resident; FlexGen adds a barrier per layer
      (sum of max(load, compute) + sync), PIPO overlaps loads with compute without barriers
      (max(sum load, sum compute)).
    - ``batch`` (Bud): one step reads all weights once and computes B tokens:
      t_step = bytes/BW + KV bytes/BW + B*FLOPs/rate; TPOT = t_step, throughput = B / t_step.
    """
    mt = _model_terms(model, plan.n_ctx)
    L = model.n_layers
    P = max(1, int(prompt_tokens))
    f_layer = mt["layer_flops"]
    net = cluster.network
    act = plan.active or plan.devices[:1]
    devs = [cluster.device(d.name) for d in act]
    head = cluster.device(plan.head)
    paper = variant == "paper"
    out_t = _seconds(mt["out_flops"], head.cpu_rate)
    if plan.schedule == "tp":
        N = len(devs)
        slice_cpu = max(_seconds(f_layer, d.cpu_rate) / N + (mt["bp"] / N / d.ram_bw if paper else 0.0) for d in devs)
        sync_bytes = model.hidden * 1.0625  # one q80 slice per peer
        def sync(tokens: int) -> float:
            if N == 1:
                return 0.0
            air = N * (N - 1) * sync_bytes if net.kind == "wifi" else (N - 1) * sync_bytes
            return net.latency + tokens * air / net.bandwidth

        bcast = (net.latency + model.hidden * 4 / net.bandwidth) if N > 1 else 0.0
        gather = (net.latency + model.vocab * 4 / N / net.bandwidth) if N > 1 else 0.0
        tpot = L * (slice_cpu + 2 * sync(1)) + bcast + gather + out_t / N
        ttft = L * (P * slice_cpu + 2 * sync(P)) + P * bcast + gather + out_t / N
        return {"tpot": tpot, "ttft": ttft, "throughput": 1.0 / tpot}
    if plan.schedule == "rpp":
        S = max(1, int(plan.options.get("S", len(devs))))
        stages = []
        hops = []
        for i, (dp, d) in enumerate(zip(act, devs)):
            t_layer = _seconds(f_layer, d.gpu_rate) if (d.gpu and dp.gpu_layers) else _seconds(f_layer, d.cpu_rate)
            st = dp.layers * (t_layer + (mt["bp"] / (d.gpu.mem_bw if (d.gpu and dp.gpu_layers) else d.ram_bw) if paper else 0.0))
            if d.name == plan.head:
                st += out_t
            stages.append(st)
            if len(devs) > 1:
                nxt = devs[(i + 1) % len(devs)].name
                hops.append(net.transfer_time(d.name, nxt, mt["hidden_bytes"]) + float(plan.options.get("msg_overhead_s", 0.0)))
        R = sum(stages) + sum(hops)
        tpot = max(R, S * max(stages))
        ttft = P * sum(stages) + sum(hops)
        return {"tpot": tpot, "ttft": ttft, "throughput": S / tpot}
    if plan.schedule == "offload":
        d = devs[0]
        assert d.gpu is not None
        res = act[0].gpu_layers
        home = plan.options.get("weights_home", "cpu")
        load_bw = d.gpu.pcie_bw if home == "cpu" else min(d.gpu.pcie_bw, d.disk_seq)
        t_load = mt["b"] / load_bw
        B = max(1, int(plan.options.get("batch", 1)))
        t_comp = B * _seconds(f_layer, d.gpu_rate) + mt["b"] / d.gpu.mem_bw
        streamed = L - res
        if plan.options.get("barrier", True):
            sync = float(plan.options.get("sync_s", 1e-4))
            step = res * t_comp + streamed * (max(t_load, t_comp) + sync)
        else:
            step = max(res * t_comp + streamed * t_comp, streamed * t_load)
        step += B * out_t
        ttft = step + (P - 1) * B * L * _seconds(f_layer, d.gpu_rate)
        return {"tpot": step, "ttft": ttft, "throughput": B / step}
    if plan.schedule == "batch":
        d = devs[0]
        B = max(1, int(plan.options.get("batch", 1)))
        ctx = int(plan.options.get("mean_context", plan.n_ctx // 2))
        weights = L * mt["b"] + mt["bo"]
        kv = B * L * mt["kv_tok"] * ctx
        t_step = (weights + kv) / d.ram_bw + B * (L * _seconds(f_layer, d.cpu_rate) + out_t)
        ttft = P * (L * _seconds(f_layer, d.cpu_rate) + 0.0) + weights / d.ram_bw + out_t
        return {"tpot": t_step, "ttft": ttft, "throughput": B / t_step}
    raise SpecError(f"unknown schedule {plan.schedule!r}", where="plan.schedule", fix="ring, tp, rpp, offload or batch")
