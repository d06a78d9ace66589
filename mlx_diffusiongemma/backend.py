"""The one seam between the MLX code and the device it runs on: every accommodation for MLX's CPU backend is
chosen here, once, when a model is loaded (`prepare_model`) or a denoising stream is created (`select`), so
`model.py`, `lora.py`, `noise.py` and `generate.py` carry no CPU special case and, on Metal, no CPU code runs.

On the CPU backend (the tests' and benchmarks' backend on Linux):
- half-precision expert matmuls run in float32 (MLX's CPU `gather_mm` is float32-only), by giving the
  experts' `SwitchLinear`s a subclass when the model is loaded;
- the passes over the vocabulary (the logit softcap, the sampler's statistics and argmax) run in NumPy on the
  host (`host.py`: MLX's x86 kernels evaluate `exp` and `tanh` an element at a time);
- per-position vocabulary work (the categorical draw) is split over one CPU stream per core (`parallel.py`).
Everywhere else every one of these is the plain MLX op.

When this process is one rank of a model sharded over several (`distributed.shard`), the vocabulary passes
and the categorical draw reduce across the ranks' slices of the vocabulary instead (`distributed.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear

from . import distributed, sampler
from .model import softcap as mlx_softcap


def _whole(fn: Callable, *arrays: mx.array):
    return fn(*arrays)


@dataclass(frozen=True)
class Backend:
    """How the denoising loop's device-dependent passes run. Every field is a plain function."""

    name: str
    softcap: Callable[[mx.array], mx.array]  # the model's final softcap (`Model.decode(softcap_kernel=...)`)
    vocab_stats: Callable[..., tuple[mx.array, ...]]  # `sampler.vocab_stats`'s contract; may consume its input
    argmax: Callable[[mx.array, float], mx.array]  # `sampler.scaled_argmax`'s contract
    per_position: Callable[..., object]  # `per_position(fn, *arrays)`: fn over positions, maybe split
    categorical: Callable[[mx.array, mx.array], mx.array]  # `sampler.inverse_cdf_sample`'s contract


Device = mx.Device | mx.DeviceType  # a device, or its kind (`mx.cpu`, `mx.gpu`)


def _on_cpu(device: Device | None) -> bool:
    device = mx.default_device() if device is None else device
    return (device if isinstance(device, mx.DeviceType) else device.type) == mx.DeviceType.cpu


def position_split(device: Device | None = None) -> Callable[..., object]:
    """`per_position(fn, *arrays)` for `device`: split over CPU streams on the CPU backend, one call elsewhere."""
    if not _on_cpu(device):
        return _whole
    from .parallel import per_position

    return per_position


def _host_sampler() -> bool:
    return os.environ.get("MLX_DIFFUSIONGEMMA_HOST_SAMPLER", "1") != "0"


def _draw(per_position: Callable[..., object]) -> Callable[[mx.array, mx.array], mx.array]:
    return lambda probs, u: per_position(sampler.inverse_cdf_sample, probs, u)


def select(device: Device | None = None) -> Backend:
    """The backend for `device` (default: MLX's default device). `MLX_DIFFUSIONGEMMA_HOST_SAMPLER=0` keeps the
    vocabulary passes in MLX on the CPU too (the per-position split stays). A process whose model is sharded
    (`distributed.active()`) gets the passes reduced across ranks."""
    split = distributed.active()
    if split is not None:
        from .host import softcap as host_softcap

        cap = host_softcap if _on_cpu(device) and _host_sampler() else mlx_softcap  # elementwise: local
        return Backend("distributed", cap, partial(distributed.vocab_stats, split), partial(distributed.argmax, split),
                       _whole, partial(distributed.categorical, split))
    if not _on_cpu(device):
        return Backend("mlx", mlx_softcap, sampler.vocab_stats, sampler.scaled_argmax, _whole, _draw(_whole))
    per_position = position_split(device)
    if not _host_sampler():
        stats = lambda x, temp, sc_dtype: per_position(lambda r: sampler.vocab_stats(r, temp, sc_dtype), x)  # noqa: E731
        best = lambda x, temp: per_position(lambda r: sampler.scaled_argmax(r, temp), x)  # noqa: E731
        return Backend("cpu", mlx_softcap, stats, best, per_position, _draw(per_position))
    from . import host

    return Backend("cpu-host", host.softcap, host.vocab_stats, host.argmax, per_position, _draw(per_position))


# Expert size (weight elements) from which one BLAS matmul per expert beats MLX's CPU `gather_mm`: measured here
# (OpenBLAS, 16-64 rows per expert) 3-10x faster from 1M elements up, even at 512x512, 4x slower at 512x128.
DENSE_EXPERT_ELEMENTS = 2**19


class Float32SwitchLinear(SwitchLinear):
    """A `SwitchLinear` for MLX's CPU backend. Its `gather_mm` is float32-only, so half-precision inputs are
    multiplied in float32 and rounded back, as a half-precision matmul's float32 accumulation would be; and
    for large experts, rows grouped by expert (`sorted_indices`) take one dense matmul per expert instead,
    which reaches BLAS."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        _, out_dims, in_dims = self["weight"].shape
        if sorted_indices and "bias" not in self and out_dims * in_dims >= DENSE_EXPERT_ELEMENTS:
            return self.per_expert(x, indices)
        if x.dtype == mx.float32:
            return super().__call__(x, indices, sorted_indices)
        w = self["weight"].astype(mx.float32).swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=indices, sorted_indices=sorted_indices)
        return y.astype(x.dtype)

    def per_expert(self, x: mx.array, indices: mx.array) -> mx.array:
        """`gather_mm` for rows `x` `[M, 1, in]` sorted by their expert `indices` `[M]`, as one matmul per run of
        equal indices (the run boundaries are read on the host: one sync, cheap on the CPU backend)."""
        ids = np.asarray(indices.reshape(-1))
        edges = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), len(ids)]
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        w = self["weight"]
        parts = [rows[a:b] @ w[int(ids[a])].astype(mx.float32).T for a, b in zip(edges, edges[1:])]
        return mx.concatenate(parts, axis=0).reshape(*x.shape[:-1], -1).astype(x.dtype)


def prepare_model(model: nn.Module, device: Device | None = None) -> nn.Module:
    """Fit a loaded model's modules to `device` (in place; returns it). On the CPU backend the experts' plain
    `SwitchLinear`s become `Float32SwitchLinear`s (same parameters); elsewhere nothing changes."""
    if _on_cpu(device):
        for _, module in model.named_modules():
            if type(module) is SwitchLinear:
                module.__class__ = Float32SwitchLinear
    return model
