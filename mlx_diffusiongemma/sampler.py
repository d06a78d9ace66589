"""Pure sampler maths for the canvas drafter: schedule, entropy, acceptance, re-noise, stop, EOS.

Every function is stateless and works on `mx.array`s; the denoising loop owns the RNG, the model and any
history (passed in and returned). Shapes: B = batch, C = canvas length, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx
import numpy as np

StabilityHistory = tuple[mx.array, ...]


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule temperature at `step`, which counts DOWN from `max_steps` (first pass) to 1 (last).

    Computed in float32 arithmetic because the reference evaluates it on a 0-dim float32 tensor; rounding in
    float64 instead differs by one ulp on ~1 step in 4 (e.g. 0.4/0.8 over 48 steps).
    """
    f32 = np.float32
    frac = f32(step) / f32(max_steps)
    return float(f32(t_min) + f32(t_max - t_min) * frac)


@partial(mx.compile, shapeless=True)
def _exp_weights(x: mx.array, x_max: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    # With y = x - max <= 0 and s = sum(e^y): H = log s - sum(e^y * y) / s, a sum of two non-negative terms.
    # Unlike -sum(p * (x - logsumexp)), nothing hinges on the rounding of logsumexp, which for |x| ~ 1e6 in
    # float32 is off by ulp(1e6) = 0.06 nats.
    y = x - x_max
    e = mx.exp(y)
    s = e.sum(axis=-1)
    return e, s, mx.log(s) - (e * y).sum(axis=-1) / s


def entropy(logits: mx.array) -> mx.array:
    """Entropy in nats of softmax(logits) over the last axis, in float32: [B, C, V] -> [B, C]."""
    x = logits.astype(mx.float32)
    return _exp_weights(x, x.max(axis=-1, keepdims=True))[2]


def entropy_bound_accept(ent: mx.array, bound: float) -> mx.array:
    """Entropy-bound acceptance (Fast-dLLM, arXiv 2505.24857): bool [B, C].

    Sort entropies ascending; the position of rank k is accepted iff cumsum_k - h_k <= bound, i.e. the k-1
    smaller entropies sum to at most `bound`. Rank 1 is always accepted (its left-hand side is 0).

    Ties: the accepted count and the multiset of accepted entropies do not depend on how ties are ordered;
    only which member of a tie group straddling the bound is taken does. MLX's sort is stable, so the lower
    position wins here; torch's CPU sort is not stable at C = 256, so that choice is unspecified there.
    """
    order = mx.argsort(ent, axis=-1)
    sorted_ent = mx.take_along_axis(ent, order, axis=-1)
    # `cumsum - own` as the reference writes it (not an exclusive cumsum), so the float32 rounding agrees;
    # torch's CPU cumsum accumulates in float64, so the last ulp can still differ right at the bound.
    ok_sorted = (mx.cumsum(sorted_ent, axis=-1) - sorted_ent) <= bound
    return mx.put_along_axis(mx.zeros(ent.shape, dtype=mx.bool_), order, ok_sorted, axis=-1)


def confidence_accept(top_p: mx.array, threshold: float) -> mx.array:
    """Accept positions whose top probability is >= `threshold`, and always each row's most confident one.

    Returns bool [B, C] with at least one True per row (so every denoising pass makes progress).
    """
    best = mx.argmax(top_p, axis=-1, keepdims=True)
    is_best = mx.arange(top_p.shape[-1]) == best
    return (top_p >= threshold) | is_best


def renoise(canvas: mx.array, accepted: mx.array, noise_ids: mx.array) -> mx.array:
    """Next canvas: accepted positions keep `canvas` (this pass's samples), the rest take `noise_ids`.

    The caller draws `noise_ids` fresh each pass, uniform over the whole vocabulary (specials included):
    the reference has no mask token and locks nothing, so earlier accepts are re-noised unless re-accepted.
    """
    return mx.where(accepted, canvas, noise_ids)


def is_stable(argmax: mx.array, history: StabilityHistory, threshold: int) -> tuple[mx.array, StabilityHistory]:
    """Whether `argmax` [B, C] equals each of the last `threshold` argmax canvases; returns (bool [B], history).

    Start every canvas with `history = ()`: until `threshold` canvases are remembered nothing is stable (the
    reference pre-fills with -1), so with threshold 1 the earliest stop is the second pass. `threshold == 0`
    is always stable and keeps no history.
    """
    batch = argmax.shape[0]
    if threshold == 0:
        return mx.ones((batch,), dtype=mx.bool_), ()
    if len(history) < threshold:
        stable = mx.zeros((batch,), dtype=mx.bool_)
    else:
        stable = mx.ones((batch,), dtype=mx.bool_)
        for past in history:
            stable = stable & (past == argmax).all(axis=-1)
    return stable, (*history, argmax)[-threshold:]


def is_confident(ent: mx.array, threshold: float) -> mx.array:
    """Mean per-position entropy (of the temperature-scaled logits) strictly below `threshold`: bool [B]."""
    return ent.mean(axis=-1) < threshold


def stop_test(
    argmax: mx.array,
    history: StabilityHistory,
    ent: mx.array,
    stability_threshold: int,
    confidence_threshold: float,
) -> tuple[mx.array, StabilityHistory]:
    """Adaptive stop (stable AND confident) per row: returns (stop bool [B], new history)."""
    stable, history = is_stable(argmax, history, stability_threshold)
    return stable & is_confident(ent, confidence_threshold), history


def finalize_eos(
    canvas: mx.array,
    eos_ids: Sequence[int],
    pad_id: int | None,
    done: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Pad a committed canvas [B, C] after each row's first EOS; returns (canvas, has_eos bool [B]).

    Everything up to and including the first EOS is kept and every later token becomes `pad_id` (no padding
    when `pad_id` is None, as in the reference). Rows flagged in `done` (finished in an earlier canvas)
    become all pad. `has_eos` says whether this canvas contains an EOS, whatever `done` says.
    """
    if len(eos_ids) == 0:
        is_eos = mx.zeros(canvas.shape, dtype=mx.bool_)
    else:
        is_eos = (canvas[..., None] == mx.array(list(eos_ids), dtype=canvas.dtype)).any(axis=-1)
    has_eos = is_eos.any(axis=-1)
    if pad_id is None:
        return canvas, has_eos
    seen = is_eos.astype(mx.int32)
    after_first = (mx.cumsum(seen, axis=-1) - seen) > 0
    if done is not None:
        after_first = after_first | done[:, None]
    return mx.where(after_first, mx.array(pad_id, dtype=canvas.dtype), canvas), has_eos


def scaled_logits(logits: mx.array, temp: float) -> mx.array:
    """The model's (softcapped) logits over the temperature, in fp32: the reference divides (not * 1/t)."""
    return logits.astype(mx.float32) / mx.array(temp, dtype=mx.float32)


def distribution(logits: mx.array, temp: float) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
    """Everything a denoising step needs from the model's softcapped logits, in few passes over V.

    Returns `(scaled, weights, total, entropy, argmax)`: `scaled = logits / temp` (the reference's processed
    logits), `weights = exp(scaled - max)` (unnormalised probabilities, [B, C, V]), `total =
    weights.sum(-1)`, the entropy per position in nats and the argmax (int32, the first index among equal
    maxima). `weights / total` are the probabilities, and `1 / total` is the top one.
    """
    scaled = scaled_logits(logits, temp)
    argmax = mx.argmax(scaled, axis=-1, keepdims=True)
    e, s, ent = _exp_weights(scaled, mx.take_along_axis(scaled, argmax, axis=-1))
    return scaled, e, s, ent, argmax.squeeze(-1).astype(mx.int32)


def vocab_stats(logits: mx.array, temp: float, sc_dtype) -> tuple[mx.array, ...]:
    """Per position: entropy, softmax total, argmax, sampling probabilities, next self-conditioning probs."""
    scaled, weights, total, ent, argmax = distribution(logits, temp)
    probs = weights / total[..., None]
    # The next step self-conditions on softmax of these logits after rounding them to the weight dtype.
    sc = probs if sc_dtype == mx.float32 else mx.softmax(scaled.astype(sc_dtype).astype(mx.float32), axis=-1)
    return ent, total, argmax, probs, sc


def scaled_argmax(logits: mx.array, temp: float) -> mx.array:
    """Argmax of the temperature-scaled logits (the first of equal maxima, as in the reference): [B, C] int32."""
    return mx.argmax(scaled_logits(logits, temp), axis=-1).astype(mx.int32)


def inverse_cdf_sample(probs: mx.array, u: mx.array) -> mx.array:
    """Categorical draw per position: the first index whose running probability exceeds `u` [B, C].

    One uniform per position instead of a Gumbel variate per vocabulary entry.
    """
    below = mx.cumsum(probs, axis=-1) <= u[..., None]
    return mx.minimum(below.sum(axis=-1), probs.shape[-1] - 1).astype(mx.int32)
