"""Encoded prompt prefixes kept across requests (the server's prompt cache), least recently used out first.

A multi-turn conversation or an agent's long fixed prompt starts every request with tokens an earlier request
already encoded; their encoder K/V are stored here by token ids (each prompt once prefilled, and each finished
conversation: prompt and reply), and a new request whose ids start with a stored entry's encodes only the rest. The bound is on the bytes of K/V held, not on the count of entries.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

import mlx.core as mx

from .cache import LayerCache

_Snapshot = tuple[mx.array, mx.array, int, int, int | None]  # keys, values, length, offset, keep


class PrefixCache:
    """Token ids -> encoder caches, at most `max_bytes` of K/V; `lookup` hands out fresh copies-on-write."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], list[_Snapshot]] = OrderedDict()
        self.sizes: dict[tuple[int, ...], int] = {}
        self.lengths: Counter[int] = Counter()  # entries per length: a lookup hashes one prefix per length
        self.hits = 0
        self.reused_tokens = 0

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def lookup(self, ids: Sequence[int], limit: int | None = None) -> tuple[list[LayerCache], int] | None:
        """The longest stored prefix of `ids` (at most `limit` tokens): `(a cache holding it, its length)`.

        The cache is new `LayerCache` objects over the stored arrays, whose buffers are exactly as long as
        what they hold, so the first append allocates new ones: a request never writes into an entry.
        """
        limit = len(ids) if limit is None else limit
        lengths = sorted((n for n in self.lengths if n <= limit), reverse=True)
        best = next((key for n in lengths if (key := tuple(ids[:n])) in self.entries), None)
        if best is None:
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        layers = []
        for keys, values, length, offset, keep in self.entries[best]:
            layer = LayerCache(None if keep is None else keep + 1)
            layer.keys, layer.values, layer.length, layer.offset = keys, values, length, offset
            layers.append(layer)
        return layers, len(best)

    def store(self, ids: Sequence[int], layers: list[LayerCache]) -> None:
        """Keep a copy of `layers`, which hold exactly `ids`; evict the least recently used to stay in bounds."""
        key = tuple(ids)
        if not key or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        snapshot = []
        for layer in layers:
            keys, values = layer.state
            # A copy: the request's own buffers have spare room and go on being written.
            snapshot.append((mx.contiguous(keys), mx.contiguous(values), layer.length, layer.offset, layer.keep))
        size = sum(k.nbytes + v.nbytes for k, v, *_ in snapshot)
        if size > self.max_bytes:
            return
        mx.eval([s[:2] for s in snapshot])
        while self.entries and self.bytes + size > self.max_bytes:
            old, _ = self.entries.popitem(last=False)
            del self.sizes[old]
            self.lengths[len(old)] -= 1
            if not self.lengths[len(old)]:
                del self.lengths[len(old)]
        self.entries[key], self.sizes[key] = snapshot, size
        self.lengths[len(key)] += 1
