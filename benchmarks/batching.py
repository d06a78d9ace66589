"""Batched denoising: aggregate tokens/s and per-request latency at 1, 2, 4 and 8 concurrent prompts.

    python benchmarks/batching.py                          # toy and random medium, fp32 (several minutes)
    python benchmarks/batching.py --models toy --batches 1,2 --canvases 1 --steps 2   # a quick look
    python benchmarks/batching.py --mixed                  # prompts of different lengths (padding, masks)

Every request is a random prompt of `--prompt-tokens` tokens that runs `--canvases` canvases of `--steps`
fixed decoder passes (adaptive stop off, no EOS), so batched and sequential runs do the same work. The
sequential baseline runs the N requests one after another through the unbatched loop (`denoise`); the batch
submits all N to the batch engine at once. For each N it reports aggregate generated tokens/s (all requests'
tokens / wall time) against sequential, per-request latency (submission to last commit) against a lone
request, the rows each expert sees per decoder pass, peak memory, and where a batched decoder pass's time
goes: the model's forward pass, the sampler's pass over the vocabulary, and the rest (draws, bookkeeping).

What to expect on Metal: a decoder pass at batch 1 reads every active expert's weights to multiply ~16 rows
each (released geometry: 256 canvas tokens x top-8 of 128 experts), which is memory-bandwidth bound: the GPU
waits on weight reads, not arithmetic. Extra rows reuse each weight read, so until the expert matmuls become
compute bound (hundreds of rows per expert on an M-series GPU) a pass over B canvases should cost little more
than one, and aggregate throughput should grow almost with B while per-request latency stays near a lone
request's. The attention over each row's own cache and the per-row vocabulary passes (B x C x V logits)
grow linearly and set the ceiling. On this CPU backend the forward pass is already compute bound at batch 1
(BLAS keeps every core busy), so batching can only remove fixed per-pass overheads: expect about 1x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openblas import reexec_with_openblas  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_diffusiongemma import load  # noqa: E402
from mlx_diffusiongemma.backend import select  # noqa: E402
from mlx_diffusiongemma.batch import BatchDenoiser  # noqa: E402
from mlx_diffusiongemma.bench import random_model, run_batch, run_once  # noqa: E402
from mlx_diffusiongemma.drafter import resolve_drafter  # noqa: E402
from mlx_diffusiongemma.noise import MLXNoise  # noqa: E402


def prompt_lengths(args, n: int) -> list[int]:
    """Every prompt `--prompt-tokens` long, or with `--mixed` spread from half to 1.5x that (padded rows)."""
    if not args.mixed:
        return [args.prompt_tokens] * n
    return [max(1, round(args.prompt_tokens * (0.5 + (i % 4) / 3))) for i in range(n)]


def sequential(model, drafter, lengths: list[int], canvases: int) -> list[float]:
    """Seconds each request takes alone through the unbatched loop, one after another."""
    out = []
    for i, length in enumerate(lengths):
        tic = time.perf_counter()
        run_once(model, drafter, length, canvases, seed=1000 + i)
        out.append(time.perf_counter() - tic)
    return out


def pass_split(model, drafter, lengths: list[int], repeat: int = 3) -> tuple[float, float]:
    """Median ms of one batched decoder forward pass and of the sampler's vocabulary pass over its logits."""
    engine = BatchDenoiser(model, drafter, eos_ids=[], pad_id=None)
    rng = np.random.default_rng(0)
    C, V = model.args.canvas_length, model.args.vocab_size
    batch = len(lengths)
    for i, length in enumerate(lengths):
        engine.submit(rng.integers(0, V, length).tolist(), MLXNoise(i), C)
    list(engine._admit())
    canvas = mx.array(rng.integers(0, V, (batch, C)))
    sc = mx.full((batch, C, V), 1.0 / V)  # every pass after a canvas's first self-conditions
    backend = select()
    forward, vocab = [], []
    for _ in range(repeat + 1):  # the first is a warm-up
        tic = time.perf_counter()
        raw = model.decode(canvas, engine.cache, self_conditioning_probs=sc, softcap_kernel=backend.softcap)
        mx.eval(raw)
        mid = time.perf_counter()
        mx.eval(*backend.vocab_stats(raw, 0.6, model.dtype))
        forward.append(mid - tic)
        vocab.append(time.perf_counter() - mid)
    return 1000 * statistics.median(forward[1:]), 1000 * statistics.median(vocab[1:])


def table(model, label: str, args) -> list[str]:
    overrides = {"max_denoising_steps": args.steps, "adaptive_stop": False}
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length, overrides)
    C = model.args.canvas_length
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    run_once(model, drafter, args.prompt_tokens, 1, seed=0)  # warm-up
    batches = [int(b) for b in args.batches.split(",")]
    lengths = prompt_lengths(args, max(batches))
    lone = statistics.median(sequential(model, drafter, lengths[:3], args.canvases))
    rows = [f"{label}: prompts of {'/'.join(map(str, sorted(set(lengths))))} tokens, "
            f"{args.canvases} canvases x {args.steps} steps, "
            f"canvas {C}; a lone request takes {lone:.2f} s; each N is timed right after its sequential run",
            "  N  aggregate tok/s  vs sequential  latency s (median/max)  vs lone  step ms  forward ms  "
            "vocab ms  rest ms  rows/expert  peak GB  (weights + estimate GB)"]
    print("\n".join(rows), flush=True)
    for n in batches:
        # Sequential and batched back to back, so a drift in the machine's speed hits both alike.
        run_batch(model, drafter, lengths[:n], 1, n, seed=0)  # warm-up at this batch size
        seq_tps = n * args.canvases * C / sum(sequential(model, drafter, lengths[:n], args.canvases))
        r = run_batch(model, drafter, lengths[:n], args.canvases, n, seed=1)
        fwd, vocab = pass_split(model, drafter, lengths[:n])
        rows.append(
            f"{n:>3}  {r.aggregate_tps:15.1f}  {r.aggregate_tps / seq_tps:12.2f}x  {r.latency_s:10.2f} / "
            f"{r.max_latency_s:6.2f}  {r.latency_s / lone:6.2f}x  {r.ms_per_step:7.1f}  {fwd:10.1f}  "
            f"{vocab:8.1f}  {max(r.ms_per_step - fwd - vocab, 0):7.1f}  {r.rows_per_expert:11.0f}  "
            f"{r.peak_memory_gb:7.3f}  ({weights:.3f} + {r.estimated_gb:.3f})"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,medium", help="toy and/or medium (random, fp32)")
    parser.add_argument("--batches", default="1,2,4,8", help="concurrent prompts to measure")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="fixed decoder passes per canvas")
    parser.add_argument("--mixed", action="store_true",
                        help="prompts of different lengths (0.5x to 1.5x --prompt-tokens): padded rows and masks")
    parser.add_argument("--no-openblas", action="store_true", help="keep MLX's own (slow) CPU BLAS")
    args = parser.parse_args()
    blas = reexec_with_openblas(not args.no_openblas)
    print(f"batched denoising on {mx.default_device()}, {blas}")
    for name in args.models.split(","):
        model = load("toy")[0] if name == "toy" else random_model(name, "float32")
        label = "toy (fp32)" if name == "toy" else f"random {name} (fp32)"
        table(model, label, args)
        print()
    print("What to expect on Metal:" + __doc__.split("What to expect on Metal:")[1].rstrip())


if __name__ == "__main__":
    main()
