"""One rank of a 2-process run for tests/test_distributed.py (run as a script, with MLX_HOSTFILE and MLX_RANK
set), and the figures it computes, which the test computes again in one process.

    python distributed_worker.py OUT.npz CHECKPOINT...

Each rank loads only its part of each checkpoint (`cluster.load_model_part`); rank 0 writes the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffusiongemma.distributed import ShardedModel, gather_vocab
from mlx_diffusiongemma.drafter import drafter_for
from mlx_diffusiongemma.generate import denoise
from mlx_diffusiongemma.noise import MLXNoise

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
    mx.eval(out)  # every rank evaluates the same collectives
    out[f"{name}/bytes"] = mx.array(sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    return {k: np.array(v) for k, v in out.items()}


def main(out: str, paths: list[str]) -> None:
    from mlx_diffusiongemma.cluster import join, load_model_part

    group = join()
    assert group is not None and group.size() == 2, "run with MLX_HOSTFILE and MLX_RANK set"
    results: dict[str, np.ndarray] = {}
    for path in paths:
        model = load_model_part(Path(path), group)
        results.update(figures(model, Path(path).name))
        results[f"{Path(path).name}/bytes_rank1"] = np.array(
            mx.distributed.all_sum(mx.array(int(results[f"{Path(path).name}/bytes"]) * group.rank()), group=group))
    if group.rank() == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
