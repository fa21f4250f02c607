"""Units. Internally everything is SI: bytes, seconds, FLOP/s, bytes/s."""

from __future__ import annotations

KiB = 1024
MiB = 1024**2
GiB = 1024**3
KB = 1e3
MB = 1e6
GB = 1e9
GFLOPS = 1e9
TFLOPS = 1e12
MS = 1e-3
US = 1e-6
MBPS = 1e6 / 8  # one megabit per second, in bytes/s


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
