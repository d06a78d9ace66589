"""The passes over the vocabulary in NumPy, on the host, for MLX's CPU backend (chosen by `backend.select`):
the model's logit softcap and the sampler's statistics.

MLX's x86 CPU kernels evaluate `exp` and `tanh` one element at a time through library calls (about 10 ns
each), and a denoising step needs both over all B x C x V logits: at C = 256, V = 32000 MLX took 160 ms for
these statistics, half a decoder pass; NumPy's SIMD kernels take 8 ms. On the CPU backend the device
memory is host memory, so the logits are read where they lie (`np.asarray` does not copy) and both the
softcapped logits and then the probabilities are written back into the logits' own buffer, which MLX then
reads in the next pass.

The formulas and their order are `model.softcap`'s and `sampler.vocab_stats`'s. NumPy's exp and tanh round differently from
MLX's in the last ulp or two (both are within a few ulp of torch's), so this path agrees with the MLX one
to float32 rounding, not bit for bit; both are token-exact with transformers under the parity tests.
Positions are split over one thread per core (NumPy releases the GIL in these loops); every row's
arithmetic is independent of the split, so results do not depend on the number of threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .model import SOFTCAP

# Floats per array that a block of rows spans: each block goes through every pass while it is in the core's
# L2 cache, instead of streaming the whole [B*C, V] tensor through memory once per pass.
_BLOCK = 1 << 17

_pool: ThreadPoolExecutor | None = None
_local = threading.local()


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _scratch(rows: int, width: int) -> np.ndarray:
    # One block-sized float32 buffer per thread, kept across steps (fresh memory costs page faults).
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
        buf = _local.buf = np.empty((rows, width), dtype=np.float32)
    return buf[:rows]


def _map_blocks(fn, n: int, width: int) -> list:
    """`fn(lo, hi, scratch)` over blocks of rows covering [0, n), the blocks shared out over one thread per
    core in contiguous runs; returns the results in row order. `scratch` is a [hi - lo, width] buffer."""
    global _pool
    step = max(1, _BLOCK // width)
    starts = list(range(0, n, step))

    def run(first: int, last: int) -> list:
        y = _scratch(step, width)
        return [fn(lo, min(lo + step, n), y[: min(lo + step, n) - lo]) for lo in starts[first:last]]

    k = min(_workers(), len(starts))
    if k == 1:
        return run(0, len(starts))
    if _pool is None:
        _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="dg-vocab")
    edges = [len(starts) * i // k for i in range(k + 1)]
    return [r for part in _pool.map(run, edges[:-1], edges[1:]) for r in part]


def _logits_view(raw: mx.array) -> tuple[np.ndarray, bool]:
    """`raw` [B, C, V] as float32 rows [B*C, V]; True when writing to it writes into `raw` (no copy)."""
    host = np.asarray(raw)  # evaluates the decoder pass
    shared = host.dtype == np.float32 and host.flags.c_contiguous and host.flags.writeable and not host.flags.owndata
    host = host if shared else np.array(host, dtype=np.float32)
    return host.reshape(-1, host.shape[-1]), shared


def _cap(x: np.ndarray) -> np.ndarray:
    # `model.softcap`, in its order, in place: 30 * tanh(x / 30).
    np.divide(x, SOFTCAP, out=x)
    np.tanh(x, out=x)
    return np.multiply(x, SOFTCAP, out=x)


def softcap(logits: mx.array) -> mx.array:
    """`model.softcap` over float32 logits [..., V], split over the cores; written into `logits`' own buffer
    when it can be (then `logits` itself is returned). Evaluates `logits`: not for a traced (trained) graph."""
    x, shared = _logits_view(logits)
    _map_blocks(lambda lo, hi, _: _cap(x[lo:hi]), x.shape[0], x.shape[1])
    return logits if shared else mx.array(x.reshape(logits.shape))


def _scale(x: np.ndarray, temp: np.float32, out: np.ndarray) -> np.ndarray:
    return np.divide(x, temp, out=out)  # the reference divides by the temperature (not * 1 / t)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even) and widened back: MLX's and torch's cast."""
    bits = x.view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.divide(e, e.sum(axis=-1, keepdims=True), out=e)


def _stats_rows(x: np.ndarray, y: np.ndarray, temp: np.float32, sc: np.ndarray | None):
    """Rows of logits `x` become probabilities in place; `y` is scratch. Returns (entropy, total, argmax)."""
    _scale(x, temp, y)
    best = y.argmax(axis=-1)
    top = np.take_along_axis(y, best[:, None], axis=-1)
    if sc is not None:
        sc[...] = _softmax_rows(_round_bf16(y))
    np.subtract(y, top, out=y)  # y = scaled - max <= 0
    np.exp(y, out=x)
    total = x.sum(axis=-1)
    # H = log s - sum(e^y * y) / s, as in sampler._exp_weights.
    ent = np.log(total) - np.multiply(x, y, out=y).sum(axis=-1) / total
    np.divide(x, total[:, None], out=x)
    return ent, total, best


def vocab_stats(raw: mx.array, temp: float, sc_dtype) -> tuple[mx.array, ...]:
    """`sampler.vocab_stats` on the host: (entropy, total, argmax, probabilities, self-conditioning probs).

    `raw` (softcapped logits) is consumed: its buffer is overwritten with the probabilities, returned as the fourth element.
    """
    B, C, V = raw.shape
    x, shared = _logits_view(raw)
    sc = None if sc_dtype == mx.float32 else np.empty_like(x)
    t = np.float32(temp)

    def rows(lo, hi, y):
        return _stats_rows(x[lo:hi], y, t, None if sc is None else sc[lo:hi])

    ent, total, best = (np.concatenate(parts) for parts in zip(*_map_blocks(rows, x.shape[0], V)))
    probs = raw if shared else mx.array(x.reshape(B, C, V))
    sc_out = probs if sc is None else mx.array(sc.reshape(B, C, V))
    per_pos = [mx.array(a.reshape(B, C)) for a in (ent.astype(np.float32), total, best.astype(np.int32))]
    return (*per_pos, probs, sc_out)


def argmax(raw: mx.array, temp: float) -> mx.array:
    """`sampler.scaled_argmax` on the host: argmax of the temperature-scaled logits (first of equal maxima): [B, C]."""
    B, C, V = raw.shape
    x, _ = _logits_view(raw)
    t = np.float32(temp)
    parts = _map_blocks(lambda lo, hi, y: _scale(x[lo:hi], t, y).argmax(axis=-1), x.shape[0], V)
    return mx.array(np.concatenate(parts).astype(np.int32).reshape(B, C))
