"""The batch engine's bookkeeping: a KV cache whose rows hold different lengths, and per-row random streams.

Rows are right-aligned: every row's newest position sits in the same slot, and a row that has encoded fewer
positions than the longest has `left[r]` invalid (zero) slots at the front, which `padding_mask` hides from
attention. Each row keeps its own position offset, so RoPE sees exactly the positions a lone run would.
"""

from __future__ import annotations

import mlx.core as mx

from .backend import select
from .cache import _STEP, LayerCache
from .noise import MLXNoise, NoiseSource


def _capacity(n: int) -> int:
    return (n + _STEP - 1) // _STEP * _STEP


class BatchLayerCache(LayerCache):
    """One layer's K/V for a batch of rows of different lengths (see the module docstring).

    `length` is the retained slot count shared by all rows; `left[r]` of them are padding for row r; `offsets[r]`
    counts row r's encoded positions. Starts empty; rows come in with `join` and go with `keep_rows`.
    """

    def __init__(self, window: int | None = None):
        # Not LayerCache.__init__: `offset` is per row here (a property), not one count.
        self.keep = window - 1 if window else None
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0
        self._pending = None
        self.offsets: list[int] = []
        self.left: list[int] = []

    @property
    def offset(self) -> mx.array:
        """Each row's count of encoded positions, `[B]`: where its next token's position starts."""
        return mx.array(self.offsets, dtype=mx.int32)

    @property
    def rows(self) -> int:
        return len(self.offsets)

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Every row encodes `k.shape[2]` new positions (a committed canvas each)."""
        keys, values = self._write(k, v)
        n = k.shape[2]
        self.offsets = [o + n for o in self.offsets]
        self.length += n
        if self.keep is not None and self.length > self.keep:
            start = self.length - self.keep
            self.keys = self.keys[..., start : self.length, :]
            self.values = self.values[..., start : self.length, :]
            self.length = self.keep
            self.left = [max(left - start, 0) for left in self.left]  # the evicted slots were the oldest
        return keys, values

    def padding_mask(self, new: int) -> mx.array | None:
        if not any(self.left):
            return None  # no padding: the same ops (and numbers) as an unbatched pass
        slots = mx.arange(self.length + new)[None, :]
        return (slots >= mx.array(self.left)[:, None])[:, None, None, :]

    def join(self, other: LayerCache) -> None:
        """Append `other`'s rows (a lone request's prefilled cache) to the batch, right edges aligned."""
        length = max(self.length, other.length)
        keys, values, left = [], [], []
        for cache, lefts in ([(self, self.left)] if self.offsets else []) + [(other, _left(other))]:
            pad = length - cache.length
            k, v = cache.state
            if pad:
                zeros = mx.zeros((*k.shape[:2], pad, k.shape[3]), k.dtype)
                k, v = mx.concatenate([zeros, k], axis=2), mx.concatenate([zeros, v], axis=2)
            keys.append(k)
            values.append(v)
            left += [x + pad for x in lefts]
        self.offsets, self.left = self.offsets + _offsets(other), left
        k, v = mx.concatenate(keys, axis=0), mx.concatenate(values, axis=0)
        self.keys = mx.zeros((*k.shape[:2], _capacity(length + 1), k.shape[3]), k.dtype)
        self.values = mx.zeros(self.keys.shape, v.dtype)
        self.keys[..., :length, :] = k
        self.values[..., :length, :] = v
        self.length = length

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (others left the batch); drop the front slots that are padding in every row."""
        self.offsets = [self.offsets[r] for r in rows]
        self.left = [self.left[r] for r in rows]
        if not rows:
            self.keys = self.values = None
            self.length = 0
            return
        index = mx.array(rows)
        trim = min(self.left)
        self.keys = self.keys[index, :, trim : self.length, :]
        self.values = self.values[index, :, trim : self.length, :]
        self.left = [x - trim for x in self.left]
        self.length -= trim


def _offsets(cache: LayerCache) -> list[int]:
    return list(cache.offsets) if isinstance(cache, BatchLayerCache) else [cache.offset] * cache.keys.shape[0]


def _left(cache: LayerCache) -> list[int]:
    return list(cache.left) if isinstance(cache, BatchLayerCache) else [0] * cache.keys.shape[0]


class BatchNoise:
    """The batch's random source: each row draws from its own stream, in the order a lone run would.

    A row whose adaptive stop has fired (see `freeze`) draws nothing more, so its stream is where a lone run
    left it; its entries are filled with zeros, which the loop discards (it keeps a stopped row's canvas).
    """

    def __init__(self, sources: list[NoiseSource]):
        self.sources = sources
        self.active = [True] * len(sources)
        self.stopped_at: list[int | None] = [None] * len(sources)
        self._draw = select().categorical

    def _rows(self, draw, shape: tuple[int, ...], dtype) -> mx.array:
        row = (1, *shape[1:])
        parts = [draw(s, row) if a else mx.zeros(row, dtype) for s, a in zip(self.sources, self.active)]
        return mx.concatenate(parts, axis=0)

    def randint(self, shape: tuple[int, ...], high: int) -> mx.array:
        return self._rows(lambda s, row: s.randint(row, high), shape, mx.int32)

    def categorical(self, probs: mx.array) -> mx.array:
        if all(isinstance(s, MLXNoise) for s in self.sources):
            # One pass over the batch's vocabulary; each row's uniforms come from its own stream.
            u = self._rows(lambda s, row: s.uniforms(row), probs.shape[:-1], mx.float32)
            return self._draw(probs, u)
        draws = [s.categorical(probs[r : r + 1]) if a else mx.zeros((1, probs.shape[1]), mx.int32)
                 for r, (s, a) in enumerate(zip(self.sources, self.active))]
        return mx.concatenate(draws, axis=0)

    def skip_categorical(self, shape: tuple[int, ...]) -> None:
        for s, a in zip(self.sources, self.active):
            if a:
                s.skip_categorical((1, *shape[1:]))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows' streams (the others' requests left the batch)."""
        self.sources = [self.sources[r] for r in rows]
        self.active = [self.active[r] for r in rows]
        self.stopped_at = [self.stopped_at[r] for r in rows]

    def freeze(self, done: mx.array, steps: int) -> None:
        """`denoise_canvas`'s `stopped` hook: rows in `done` stop drawing; remember the pass they stopped at."""
        for r, flag in enumerate(done.tolist()):
            if flag and self.active[r]:
                self.active[r], self.stopped_at[r] = False, steps
