"""The encoder KV cache: what the causal encoder writes and the canvas decoder reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

# Buffers grow in steps of this many positions so appends rarely reallocate.
_STEP = 256


class LayerCache:
    """K and V of one layer, in `[B, kv_heads, positions, head_dim]` buffers with spare room at the end.

    `offset` counts every position ever encoded (positions continue from it); `length` is how many are
    retained. Sliding layers retain the last `window - 1` positions, as the reference's dynamic cache does.
    The canvas pass writes its K/V into the spare room past `length` without changing either count, so it
    reads `[retained ; canvas]` without concatenating (copying) the cache on every denoising step.
    """

    def __init__(self, window: int | None = None):
        self.keep = window - 1 if window else None
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0
        self.offset = 0
        self._pending: tuple | None = None  # (state before a provisional append, its new K, V)

    def _write(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        n = k.shape[2]
        end = self.length + n
        if self.keys is None or self.keys.shape[2] < end:
            capacity = (end + _STEP - 1) // _STEP * _STEP
            new_k = mx.zeros((*k.shape[:2], capacity, k.shape[3]), k.dtype)
            new_v = mx.zeros((*v.shape[:2], capacity, v.shape[3]), v.dtype)
            if self.length:
                new_k[..., : self.length, :] = self.keys[..., : self.length, :]
                new_v[..., : self.length, :] = self.values[..., : self.length, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., self.length : end, :] = k
        self.values[..., self.length : end, :] = v
        return self.keys[..., :end, :], self.values[..., :end, :]

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store new encoder K/V; return `[retained ; new]` for this call's attention."""
        if self._pending is not None:
            self._pending = (self._pending[0], k, v)
        keys, values = self._write(k, v)
        # Rebound, never `+=`: an array offset updated in place would move the positions of ropes made from it.
        self.offset = self.offset + k.shape[2]
        self.length += k.shape[2]
        if self.keep is not None and self.length > self.keep:
            start = self.length - self.keep
            self.keys = self.keys[..., start : self.length, :]
            self.values = self.values[..., start : self.length, :]
            self.length = self.keep
        return keys, values

    def provisional(self) -> None:
        """Make the next `append` provisional: `settle(n)` then retains only its first n positions."""
        self._pending = ((self.keys, self.values, self.length, self.offset), None, None)

    def settle(self, n: int) -> None:
        """Settle a provisional append as if only its first `n` positions had been encoded.

        A sliding layer may already have evicted older positions to make room for the whole append, so the
        state from before it is put back and the first n K/V appended again (a cheap copy of n positions).
        """
        (keys, values, length, offset), k, v = self._pending
        self._pending = None
        if n < k.shape[2]:
            self.keys, self.values, self.length, self.offset = keys, values, length, offset
            self.append(k[..., :n, :], v[..., :n, :])

    def with_canvas(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Return `[retained ; canvas]` for the decoder; the cache's contents stay as they were."""
        return self._write(k, v)

    def padding_mask(self, new: int) -> mx.array | None:
        """Which of the `[retained ; new]` key slots each row may attend to; None: all of them (one row)."""
        return None

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        """The retained K and V (for tests and inspection)."""
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]


class ArrayCache:
    """One layer's K/V as plain arrays, joined by concatenation instead of written into buffers: differentiable,
    for training. `Model.encode` fills it over a whole sequence (every position kept: the encoder's own masks
    apply the sliding window), and `prefix(n, window)` is the cache the decoder would see after only the first
    n positions had been encoded: a causal position's K/V depend only on what precedes it."""

    def __init__(self, keys: mx.array | None = None, values: mx.array | None = None, offset: int | mx.array = 0):
        self.keys, self.values, self.offset = keys, values, offset

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def with_canvas(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            return k, v
        return mx.concatenate([self.keys, k], axis=2), mx.concatenate([self.values, v], axis=2)

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = self.with_canvas(k, v)
        # Rebound, never `+=`: an array offset updated in place would move the positions of ropes made from it.
        self.offset = self.offset + k.shape[2]
        return self.keys, self.values

    def padding_mask(self, new: int) -> None:
        return None

    def prefix(self, n: int, window: int | None = None) -> "ArrayCache":
        """A read-only view of the first `n` positions, retaining the last `window - 1` of them as a sliding
        layer's `LayerCache` does."""
        start = max(0, n - (window - 1)) if window else 0
        return ArrayCache(self.keys[:, :, start:n], self.values[:, :, start:n], n)


def cache_offset(cache: list[LayerCache]) -> int | mx.array:
    """Number of positions encoded so far (every layer has seen the same tokens); per row ([B]) in a batch."""
    return cache[0].offset if cache else 0


@dataclass
class PromptCache:
    """A conversation's encoder cache and the token ids it holds, reused across chat turns.

    `stream_generate` encodes only the tokens a new prompt adds after `tokens`; when the new prompt does not
    start with exactly those tokens (a template rewrote history), it starts over. `layers` is None whenever
    the cache may be incomplete (before the first turn, or after an interrupted one).
    """

    layers: list[LayerCache] | None = None
    tokens: list[int] = field(default_factory=list)

    def reusable_prefix(self, ids: list[int]) -> int:
        """How many leading ids are already encoded (0 when the cache cannot be extended to `ids`)."""
        n = len(self.tokens)
        if self.layers is None or n == 0 or n >= len(ids) or ids[:n] != self.tokens:
            return 0
        return n

    def take(self, ids: list[int], fresh: Callable[[], list[LayerCache]]) -> tuple[list[LayerCache], int]:
        """The layers a generation of `ids` continues (these, or `fresh()` ones when they cannot be extended)
        and how many ids they already hold; the cache reads as incomplete until the generation puts them back."""
        reused = self.reusable_prefix(ids)
        layers = self.layers if reused else fresh()
        self.layers = None
        return layers, reused

    def reset(self) -> None:
        self.layers, self.tokens = None, []

    def checkpoint(self):
        """Remember the cache as it is now; calling the returned function puts it back exactly.

        For a turn that is interrupted (Ctrl-C), which would otherwise leave the cache unusable. Nothing is
        copied: encoding only writes past a layer's retained `length` (or into new buffers), so the retained
        part of the buffers saved here stays as it was.
        """
        layers, tokens = self.layers, list(self.tokens)
        saved = [(c.keys, c.values, c.length, c.offset) for c in layers or []]

        def restore() -> None:
            for c, (keys, values, length, offset) in zip(layers or [], saved):
                c.keys, c.values, c.length, c.offset = keys, values, length, offset
            self.layers, self.tokens = layers, list(tokens)

        return restore
