"""One rank of a 2-process run for tests/test_distributed.py (run as a script, with MLX_HOSTFILE and MLX_RANK
set), and the figures it computes, which the test computes again in one process.

    python distributed_worker.py OUT.npz CHECKPOINT...

Each rank loads only its part of each checkpoint (`cluster.load_model_part`); rank 0 writes the figures.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffusiongemma import distributed
from mlx_diffusiongemma.distributed import ShardedModel, gather_vocab
from mlx_diffusiongemma.drafter import drafter_for
from mlx_diffusiongemma.generate import denoise
from mlx_diffusiongemma.noise import MLXNoise, NumpyNoise

PRESETS = ("reference", "fast", "speculative")
STEPS = 5


def _whole(model, logits: mx.array) -> mx.array:
    return gather_vocab(logits, model.vocab) if isinstance(model, ShardedModel) else logits


def figures(model, name: str) -> dict[str, np.ndarray]:
    """Decoder logits (with and without self-conditioning) and the tokens each drafter preset commits."""
    rng = np.random.default_rng(0)
    V, C = model.args.vocab_size, model.args.canvas_length
    prompt = mx.array(rng.integers(0, V, (2, 7)))
    canvas = mx.array(rng.integers(0, V, (2, C)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    plain = model.decode(canvas, cache)
    sc = mx.softmax(_whole(model, plain) / 0.7, axis=-1)
    local = sc if not isinstance(model, ShardedModel) else sc[..., model.vocab.first : model.vocab.first + model.vocab.count]
    out = {f"{name}/logits": _whole(model, plain), f"{name}/logits_sc": _whole(model, model.decode(canvas, cache, self_conditioning_probs=local))}
    for preset in PRESETS:
        drafter = drafter_for(model, preset, {"max_denoising_steps": STEPS})
        events = denoise(model, prompt[:1], drafter, MLXNoise(5), 2, [1], 0)
        out[f"{name}/{preset}"] = mx.array([t for e in events if e.kind == "commit" for t in e.tokens[0].tolist()])
    # The parity tests' host noise source (float64 draws on the whole vocabulary) gives the same text too.
    drafter = drafter_for(model, "reference", {"max_denoising_steps": STEPS})
    events = denoise(model, prompt[:1], drafter, NumpyNoise(5), 2, [1], 0)
    out[f"{name}/numpy_noise"] = mx.array([t for e in events if e.kind == "commit" for t in e.tokens[0].tolist()])
    mx.eval(out)  # every rank evaluates the same collectives
    out[f"{name}/bytes"] = mx.array(sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    return {k: np.array(v) for k, v in out.items()}


def sampler_case(V: int = 11) -> tuple[mx.array, mx.array]:
    """Logits [1, 4, V] whose rows tie across the ranks' slices (ids 2 and V - 2), peak in the last slice, and
    tie inside one slice; and uniforms for a draw from each row."""
    rows = np.linspace(-3.0, 2.0, 4 * V, dtype=np.float32).reshape(4, V)
    rows[0, [2, V - 2]] = 9.0
    rows[1, V - 1] = 9.0
    rows[2, [V - 3, V - 2]] = 9.0
    return mx.array(rows[None]), mx.array([[0.3, 0.999, 0.6, 0.05]], dtype=mx.float32)


def sampler_figures(stats, best, draw, split=None) -> dict[str, np.ndarray]:
    """The vocabulary passes over `sampler_case` by the given functions: a process's own, or those reduced
    across the ranks of `split`, each given its slice of the vocabulary (joined again for the comparison)."""
    logits, u = sampler_case()
    whole = (lambda x: x) if split is None else (lambda x: gather_vocab(x, split))
    logits = logits if split is None else logits[..., split.first : split.first + split.count]
    ent, total, argmax, probs, sc = stats(logits, 0.7, mx.bfloat16)
    out = {"sampler/entropy": ent, "sampler/total": total, "sampler/argmax": argmax,
           "sampler/argmax_only": best(logits, 0.7), "sampler/draw": draw(probs, u), "sampler/probs": whole(probs),
           "sampler/sc": whole(sc)}
    mx.eval(out)
    return {k: np.array(v) for k, v in out.items()}


def main(out: str, paths: list[str]) -> None:
    from mlx_diffusiongemma.cluster import join, load_model_part

    group = join()
    assert group is not None and group.size() == 2, "run with MLX_HOSTFILE and MLX_RANK set"
    V = sampler_case()[0].shape[-1]
    parts = tuple(distributed.spans(V, group.size()))
    first, stop = parts[group.rank()]
    split = distributed.VocabSplit(group, first, stop - first, V, parts)
    fns = (partial(f, split) for f in (distributed.vocab_stats, distributed.argmax, distributed.categorical))
    results = sampler_figures(*fns, split=split)
    for path in paths:
        model = load_model_part(Path(path), group)
        results.update(figures(model, Path(path).name))
        results[f"{Path(path).name}/bytes_rank1"] = np.array(
            mx.distributed.all_sum(mx.array(int(results[f"{Path(path).name}/bytes"]) * group.rank()), group=group))
    if group.rank() == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
