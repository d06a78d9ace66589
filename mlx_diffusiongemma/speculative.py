"""The speculative commit (`verify: "ar"`): the causal encoder checks a drafted canvas as it encodes it.

DiffusionGemma's encoder is trained with a next-token loss, so the commit pass that encodes a draft also
says, at every position, which token the encoder itself would have written there. A draft is accepted up to
its first disagreement; the cache is then rolled back to the accepted tokens (see `LayerCache.settle`), and the
encoder's own choice at the disagreement opens the next canvas. Verifying costs one encoder pass over the
canvas, which the reference spends anyway to commit it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import LayerCache
from .model import Model


@dataclass
class Verified:
    """The outcome of verifying one draft (batch of 1)."""

    encoded: mx.array  # [1, a]: the accepted draft prefix, now in the cache (a >= 1)
    tokens: mx.array  # [1, a or a + 1]: what is committed: `encoded`, then EOS if the encoder chose it next
    following: mx.array  # [1]: the encoder's choice after `encoded` (opens the next canvas)
    eos: bool  # the committed tokens end with an EOS


def _accepted(draft: list[int], expected: list[int], probable: list[bool] | None) -> int:
    """Length of the draft's leading run that the verifier accepts."""
    for i, (d, e) in enumerate(zip(draft, expected)):
        if d != e and not (probable and i > 0 and probable[i - 1]):
            return i
    return len(draft)


def verify(
    model: Model,
    cache: list[LayerCache],
    draft: mx.array,
    first: mx.array,
    eos_ids: Sequence[int],
    min_prob: float | None = None,
) -> Verified:
    """Encode `draft` [1, n] provisionally and keep the prefix the encoder agrees with.

    `first` [1] is the encoder's choice for the draft's first position (from the pass before); the drafter
    pins it, so at least one token is always accepted. Draft token i > 0 is accepted while it equals the
    argmax of the encoder's logits after token i - 1 (greedy: the text is the encoder's greedy decoding), or,
    with `min_prob`, while the encoder gives it at least that probability (not greedy-exact).
    """
    for c in cache:
        c.provisional()
    logits = model.encode(draft, cache, logits="all")[0]  # [n, V]: row i predicts draft token i + 1
    choice = mx.argmax(logits, axis=-1).astype(mx.int32)
    expected = mx.concatenate([first.astype(mx.int32), choice])  # [n + 1]
    probable = None
    if min_prob is not None:
        p = mx.softmax(logits[:-1], axis=-1)
        probable = mx.take_along_axis(p, draft[0, 1:, None], axis=-1)[:, 0] >= min_prob
    mx.eval(expected if probable is None else [expected, probable])
    ids, want = draft[0].tolist(), expected.tolist()
    a = _accepted(ids, want, None if probable is None else probable.tolist())
    if a == 0:
        raise ValueError("the draft must open with the verifier's own choice (`first`)")
    eos = set(eos_ids)
    hit = next((i for i in range(a) if ids[i] in eos), None)
    a = a if hit is None else hit + 1  # nothing after an EOS is kept, in the text or the cache
    for c in cache:
        c.settle(a)
    committed = ids[:a]
    ends = hit is not None or want[a] in eos
    if hit is None and ends:
        committed.append(want[a])  # the next token is EOS: commit it now rather than draft a canvas for it
    return Verified(mx.array([ids[:a]]), mx.array([committed]), mx.array([want[a]]), ends)
