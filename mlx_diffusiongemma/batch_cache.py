"""The batch engine's KV cache: rows of different lengths in one buffer, each encoding on its own schedule.

Row r holds its retained positions in slots `[lo[r], hi[r])` of a shared `[B, kv_heads, length, head_dim]`
buffer; the slots outside a row's span are invisible to it (`padding_mask`). Rows commit canvases at
different decoder passes, so a row encodes alone: `row_view` is a one-row `LayerCache` of its span and
`put_row` writes back what an encode added, leaving every other row as it was. Each row keeps its own
position offset, so RoPE sees exactly the positions a lone run would.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import _STEP, LayerCache


def _capacity(n: int) -> int:
    return (n + _STEP - 1) // _STEP * _STEP


class BatchLayerCache(LayerCache):
    """One layer's K/V for a batch of rows (see the module docstring): `length` slots shared by all rows, row r's
    span `[lo[r], hi[r])`, `offsets[r]` its encoded positions. Starts empty; rows come in with `join` and go
    with `keep_rows`."""

    def __init__(self, window: int | None = None):
        # Not LayerCache.__init__: `offset` is per row here (a property), not one count.
        self.keep = window - 1 if window else None
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.length = 0
        self._pending = None
        self.offsets: list[int] = []
        self.lo: list[int] = []
        self.hi: list[int] = []

    @property
    def offset(self) -> mx.array:
        """Each row's count of encoded positions, `[B]`: where its next token's position starts."""
        return mx.array(self.offsets, dtype=mx.int32)

    @property
    def rows(self) -> int:
        return len(self.offsets)

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError("a batch's rows encode one at a time: row_view, encode, put_row")

    def padding_mask(self, new: int) -> mx.array | None:
        """Row r sees its own span and the `new` slots after `length` (its canvas); None when every row spans all."""
        if all(lo == 0 for lo in self.lo) and all(hi == self.length for hi in self.hi):
            return None  # the same ops (and numbers) as an unbatched pass
        slots = mx.arange(self.length + new)[None, :]
        lo, hi = mx.array(self.lo)[:, None], mx.array(self.hi)[:, None]
        return ((slots >= lo) & ((slots < hi) | (slots >= self.length)))[:, None, None, :]

    def row_view(self, r: int) -> LayerCache:
        """Row r alone, as the `LayerCache` a lone run would hold (its buffers are new; this cache is unchanged)."""
        own = LayerCache()
        own.keep, own.offset = self.keep, self.offsets[r]
        own.length = self.hi[r] - self.lo[r]
        own.keys = self.keys[r : r + 1, :, self.lo[r] : self.hi[r], :]
        own.values = self.values[r : r + 1, :, self.lo[r] : self.hi[r], :]
        return own

    def put_row(self, r: int, view: LayerCache) -> None:
        """Take back row r's `row_view` after it encoded more positions: they go after its span."""
        added = view.offset - self.offsets[r]
        end = self.hi[r] + added
        if end > self.length:
            self._grow(end)
        n = min(added, view.length)  # a sliding layer retains at most `keep` of them
        self.keys[r : r + 1, :, end - n : end, :] = view.keys[..., view.length - n : view.length, :]
        self.values[r : r + 1, :, end - n : end, :] = view.values[..., view.length - n : view.length, :]
        self.offsets[r], self.hi[r], self.lo[r] = view.offset, end, end - view.length
        self._compact()

    def join(self, other: LayerCache) -> None:
        """Add a lone request's prefilled cache as a new row."""
        spans = [(self.keys[r : r + 1, :, lo:hi, :], self.values[r : r + 1, :, lo:hi, :])
                 for r, (lo, hi) in enumerate(zip(self.lo, self.hi))]
        k, v = other.state
        self._pack(spans + [(k, v)], self.offsets + [other.offset])

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (others left the batch)."""
        self.offsets = [self.offsets[r] for r in rows]
        self.lo, self.hi = [self.lo[r] for r in rows], [self.hi[r] for r in rows]
        if not rows:
            self.keys = self.values = None
            self.length = 0
            return
        index = mx.array(rows)
        self.keys, self.values = self.keys[index], self.values[index]
        self._compact()

    def _grow(self, end: int) -> None:
        """Room for `end` slots (the new ones hold zeros, which no row's span covers yet)."""
        if self.keys.shape[2] < end:
            shape = (*self.keys.shape[:2], _capacity(end + 1), self.keys.shape[3])
            keys, values = mx.zeros(shape, self.keys.dtype), mx.zeros(shape, self.values.dtype)
            keys[..., : self.length, :] = self.keys[..., : self.length, :]
            values[..., : self.length, :] = self.values[..., : self.length, :]
            self.keys, self.values = keys, values
        self.length = end

    def _compact(self) -> None:
        """Drop slots no row spans; repack the rows right-aligned when their spans have drifted apart (rows that
        commit more often run ahead) by more than a buffer step, so memory stays near rows x longest span."""
        start, end = min(self.lo), max(self.hi)
        if end - start > max(h - lo for lo, h in zip(self.lo, self.hi)) + _STEP:
            spans = [(self.keys[r : r + 1, :, lo:hi, :], self.values[r : r + 1, :, lo:hi, :])
                     for r, (lo, hi) in enumerate(zip(self.lo, self.hi))]
            self._pack(spans, self.offsets)
        elif start or end < self.length:
            self.keys, self.values = self.keys[..., start:end, :], self.values[..., start:end, :]
            self.lo, self.hi = [x - start for x in self.lo], [x - start for x in self.hi]
            self.length = end - start

    def _pack(self, spans: list[tuple[mx.array, mx.array]], offsets: list[int]) -> None:
        """Rebuild the buffer from one `(K, V)` span per row, right edges aligned."""
        length = max(k.shape[2] for k, _ in spans)
        k0 = spans[-1][0]
        shape = (len(spans), k0.shape[1], _capacity(length + 1), k0.shape[3])
        self.keys, self.values = mx.zeros(shape, k0.dtype), mx.zeros(shape, spans[-1][1].dtype)
        self.lo, self.hi = [], []
        for r, (k, v) in enumerate(spans):
            lo = length - k.shape[2]
            self.keys[r : r + 1, :, lo:length, :] = k
            self.values[r : r + 1, :, lo:length, :] = v
            self.lo.append(lo)
            self.hi.append(length)
        self.offsets, self.length = list(offsets), length
