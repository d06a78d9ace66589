"""Per-position vocabulary work split across CPU streams (one per core) on MLX's CPU backend.

Elementwise kernels there run on one thread per stream. Positions are independent in the sampler's passes
over the vocabulary (the categorical draw's cumulative sum; with `host` disabled, all of them), so chunks
of positions run on separate streams and the results are concatenated: bit-identical to one stream.
(Inside the forward pass the same split measured slower: BLAS already uses every core there.)
On Metal (one GPU) everything stays on the default stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx

_streams: list | None = None


def cpu_streams() -> list:
    """One CPU stream per available core (or `MLX_DIFFUSIONGEMMA_CPU_STREAMS`), [] off the CPU backend."""
    global _streams
    if _streams is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        wanted = int(os.environ.get("MLX_DIFFUSIONGEMMA_CPU_STREAMS", min(cores, 8)))
        on_cpu = mx.default_device().type == mx.DeviceType.cpu
        _streams = [mx.new_stream(mx.cpu) for _ in range(wanted)] if on_cpu and wanted > 1 else []
    return _streams


def per_position(fn: Callable, *arrays: mx.array):
    """`fn(*arrays)` computed on chunks of axis 1 in parallel on the CPU, outputs concatenated on axis 1.

    `fn` must treat positions independently and return an array or a tuple of arrays shaped [B, C, ...].
    """
    streams = cpu_streams()
    C = arrays[0].shape[1]
    if len(streams) < 2 or C < 2 * len(streams) or mx.default_device().type != mx.DeviceType.cpu:
        return fn(*arrays)
    edges = [C * i // len(streams) for i in range(len(streams) + 1)]
    outs = []
    for stream, a, b in zip(streams, edges, edges[1:]):
        with mx.stream(stream):
            outs.append(fn(*(x[:, a:b] for x in arrays)))
    if isinstance(outs[0], tuple):
        return tuple(mx.concatenate(list(parts), axis=1) for parts in zip(*outs))
    return mx.concatenate(outs, axis=1)
