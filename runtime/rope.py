"""RoPE's inverse frequencies of a model (Llama 3's rope scaling included): used by the model's
attention and by the GGUF writer (rope_freqs.weight), so neither imports the other for it."""

from __future__ import annotations

import math

import numpy as np

from primasim.core.model import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """RoPE inverse frequencies, with Llama 3's rope scaling (as transformers' `llama3` rope type)."""
    d = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    rs = spec.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wl, high_wl = rs.original_max_position / rs.low_freq_factor, rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, (1 - smooth) * scaled / rs.factor + smooth * scaled, scaled).astype(np.float32)
