"""Injectable randomness for the denoising loop: every random number it uses comes from one source.

The loop draws, in order: the initial canvas (`randint`), then per step a categorical sample of every
position (`categorical`) and fresh re-noise ids (`randint`). That is the reference's order of
`torch.randint` / `torch.multinomial` calls, so a test can feed both implementations the same numbers.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

from .backend import select
from .distributed import active, gather_vocab
from .errors import UsageError


class NoiseSource(Protocol):
    def randint(self, shape: tuple[int, ...], high: int) -> mx.array:
        """Uniform ids in `[0, high)`."""

    def categorical(self, probs: mx.array) -> mx.array:
        """One draw per position from `probs` over the last axis: [B, C, V] -> [B, C]."""

    def skip_categorical(self, shape: tuple[int, ...]) -> None:
        """Consume the numbers `categorical` would for `shape` positions, without drawing (a step whose
        sample is never used still advances the stream, as the reference's does)."""


MAX_SEED = 2**64 - 1  # MLX's keys are 64-bit


def check_seed(seed, name: str = "seed") -> int:
    """`seed` if MLX can key on it (a whole number from 0 to 2**64 - 1), else a `UsageError` saying so."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{name} must be a whole number from 0 to {MAX_SEED} (got {seed!r})")
    return int(seed)


class MLXNoise:
    """The default: MLX's counter-based generator, seeded, on device (no host round trips)."""

    def __init__(self, seed: int):
        self.key = mx.random.key(check_seed(seed))
        self._draw = select().categorical  # the categorical draw's passes over V, split where that pays

    def _next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def randint(self, shape: tuple[int, ...], high: int) -> mx.array:
        return mx.random.randint(0, high, shape, dtype=mx.int32, key=self._next())

    def uniforms(self, shape: tuple[int, ...]) -> mx.array:
        """The uniforms `categorical` draws for `shape` positions (a batch gathers its rows' in one array)."""
        return mx.random.uniform(shape=shape, key=self._next())

    def categorical(self, probs: mx.array) -> mx.array:
        return self._draw(probs, self.uniforms(probs.shape[:-1]))

    def skip_categorical(self, shape: tuple[int, ...]) -> None:
        self._next()


def inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i with cdf[i-1] <= u * total < cdf[i], per row of `probs` [N, V] (float64 cumsum)."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    target = u * cdf[:, -1]
    idx = (cdf <= target[:, None]).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)


class NumpyNoise:
    """A NumPy stream, for replaying exactly the numbers another implementation consumed (parity tests).

    Categorical draws use inverse-CDF sampling with one uniform per position, with the running sum in
    float64 on the host so rounding cannot move a draw; `inverse_cdf` is the same rule for the other side.
    """

    def __init__(self, seed: int | np.random.Generator):
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def randint(self, shape: tuple[int, ...], high: int) -> mx.array:
        return mx.array(self.rng.integers(0, high, size=shape), dtype=mx.int32)

    def categorical(self, probs: mx.array) -> mx.array:
        split = active()
        if split is not None:  # this rank holds a slice of the vocabulary: the host's draw needs all of it
            probs = gather_vocab(probs, split)
        host = np.array(probs)
        flat = host.reshape(-1, host.shape[-1])
        idx = inverse_cdf(flat, self.rng.random(flat.shape[0]))
        return mx.array(idx.reshape(host.shape[:-1]), dtype=mx.int32)

    def skip_categorical(self, shape: tuple[int, ...]) -> None:
        self.rng.random(int(np.prod(shape)))
