"""Side by side, in one run: our runner vs mlx-vlm's vs transformers on one random checkpoint.

    pip install -e '.[test]' mlx-vlm cmeel-openblas   # cmeel-openblas (+ libgfortran5) is optional
    python benchmarks/compare.py [--canvases 2 --steps 4 --prompt-tokens 100 --repeat 3]

Every engine drafts the same number of canvases of the same length with the reference sampler (entropy
bound, temperature schedule, self-conditioning) at a fixed number of denoising steps, no adaptive stop and
no EOS, after the same prompt; the script checks that each did the same number of decoder passes. MLX's Linux
CPU wheel links a slow reference BLAS, so when cmeel-openblas is installed the script re-runs itself with
OpenBLAS interposed (LD_PRELOAD), which every MLX engine in the process then shares; `--no-openblas` keeps
the wheel's BLAS. Timings are medians over `--repeat` runs after one warm-up.

For our runner it also times the model's forward passes alone (prefill, decoder passes, commit pass) and
the final logit softcap, which the reference computes in its forward and our loop in its sampler pass, and
prints the share of a canvas spent outside the forward passes, with the softcap counted in and out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "benchmarks")]

from openblas import reexec_with_openblas  # noqa: E402

MEDIUM = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              global_head_dim=128, num_global_key_value_heads=2, num_experts=16, top_k_experts=4,
              moe_intermediate_size=256, sliding_window=512, max_position_embeddings=4096)
# Other shapes of the same cost class: where the expert gathers dominate (many small experts, as the released
# model's 128 top-8) and where the dense matmuls do (few wide experts).
GEOMETRIES = {
    "medium": (MEDIUM, "hidden 512, 6 layers, 16 experts top-4"),
    "many-experts": ({**MEDIUM, "num_experts": 64, "top_k_experts": 8, "moe_intermediate_size": 64},
                     "hidden 512, 6 layers, 64 experts top-8 of width 64"),
    "wide": ({**MEDIUM, "hidden_size": 1024, "intermediate_size": 2048, "num_experts": 8, "top_k_experts": 2,
              "moe_intermediate_size": 1024}, "hidden 1024, 6 layers, 8 experts top-2 of width 1024"),
}


def build(path: Path, vocab: int, canvas: int, geometry: dict = MEDIUM) -> Path:
    from checkpoints import build_checkpoint

    path = build_checkpoint(path, layout="hub", seed=0, num_layers=6, vocab_size=vocab, canvas_length=canvas,
                            embed_std=None, **geometry)
    # Give the small test tokenizer an entry for every model id: mlx-vlm's detokenizer indexes by id.
    file = path / "tokenizer.json"
    tokenizer = json.loads(file.read_text())
    table = tokenizer["model"]["vocab"]
    taken = set(table.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    for i in range(vocab):
        if i not in taken:
            table[f"<unused{i}>"] = i
    file.write_text(json.dumps(tokenizer))
    return path


def time_runs(run, repeat: int) -> tuple[list[float], int]:
    run()  # warm-up: compilation, allocation, page-in
    times, passes = [], 0
    for _ in range(repeat):
        tic = time.perf_counter()
        passes = run()
        times.append(time.perf_counter() - tic)
    return times, passes


def ours(path: Path, ids, canvases: int, steps: int, repeat: int, breakdown: bool = True):
    import mlx.core as mx

    from mlx_diffusiongemma.drafter import resolve_drafter
    from mlx_diffusiongemma.generate import denoise
    from mlx_diffusiongemma.loader import load_model
    from mlx_diffusiongemma.noise import MLXNoise

    model = load_model(path)
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length,
                              {"max_denoising_steps": steps, "adaptive_stop": False})
    prompt = mx.array([ids])

    def run():
        events = denoise(model, prompt, drafter, MLXNoise(0), canvases, eos_ids=[], pad_id=0)
        return sum(e.steps for e in events if e.kind == "commit")

    times, passes = time_runs(run, repeat)
    return times, passes, _forward_seconds(model, prompt, canvases, steps) if breakdown else None


def _forward_seconds(model, prompt, canvases: int, steps: int, repeat: int = 3) -> dict[str, float]:
    """Seconds per run spent in the model's forward passes, each timed alone (medians), as the loop calls them.

    `forward`: the prefill; every decoder pass (embedding, self-conditioning matmul and MLP from a canvas's
    second pass on, layers, LM head), over the cache that canvas sees; the commit passes. Without the final
    logit softcap. `softcap`: that softcap over every decoder pass's logits, timed with the kernel the loop
    uses on this backend (`backend.select()`: NumPy on the host on the CPU backend).
    """
    import mlx.core as mx

    from mlx_diffusiongemma.backend import select

    plain = lambda x: x  # noqa: E731  (the forward alone: no softcap)

    C, V = model.args.canvas_length, model.args.vocab_size
    canvas = mx.array(list(range(C)), dtype=mx.int32)[None] % V

    def timed(fn, committed: int = 0, samples: int = repeat):
        times = []
        for _ in range(samples):
            cache = model.make_cache()
            model.encode(prompt, cache)
            for _ in range(committed):
                model.encode(canvas, cache)
            mx.eval([c.keys for c in cache])
            tic = time.perf_counter()
            mx.eval(fn(cache))
            times.append(time.perf_counter() - tic)
        return statistics.median(times)

    probs = mx.softmax(mx.random.normal((1, C, V)), axis=-1)
    total = timed(lambda cache: (model.encode(prompt, model.make_cache()), [])[1])  # the prefill
    for i in range(canvases):  # canvas i attends to the prompt and the i canvases committed before it
        total += timed(lambda cache: model.decode(canvas, cache, softcap_kernel=plain), i)
        total += (steps - 1) * timed(
            lambda cache: model.decode(canvas, cache, self_conditioning_probs=probs, softcap_kernel=plain), i)
        if i:
            total += timed(lambda cache: (model.encode(canvas, cache), [c.keys for c in cache])[1], i - 1)
    logits = mx.random.normal((1, C, V)) * 10
    mx.eval(logits)
    cap = timed(lambda _: select().softcap(logits), samples=5 * repeat)  # the host kernel writes in place
    return {"forward": total, "softcap": canvases * steps * cap}


def mlx_vlm(path: Path, ids, canvases: int, steps: int, repeat: int):
    import mlx.core as mx
    from mlx_vlm import load

    class NoStop:  # mlx-vlm's stopping criteria object, minus EOS
        eos_token_ids: list[int] = []

        def add_eos_token_ids(self, *_):
            pass

        def reset(self, *_):
            pass

        def __call__(self, _token):
            return False

    model, processor = load(str(path))
    tokenizer = processor.tokenizer
    tokenizer.stopping_criteria = NoStop()
    # No stop keys: exactly `steps` passes per canvas; the reference sampler settings.
    model.config.generation_config = {
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}, "t_min": 0.4,
        "t_max": 0.8,
    }
    C = model.config.canvas_length
    prompt = mx.array([ids], dtype=mx.int32)

    def run():
        mx.random.seed(0)
        stats: dict = {}
        out = model.generate(prompt, tokenizer=tokenizer, processor=processor, steps=steps, gen_length=canvases * C,
                             diffusion_sampler="entropy-bound", diffusion_full_canvas=True, temperature=1.0,
                             stats=stats)
        mx.eval(out)
        return int(stats["diffusion_denoising_steps"])

    return time_runs(run, repeat)


def transformers_engine(path: Path, ids, canvases: int, steps: int, repeat: int):
    import torch

    from checkpoints import load_reference

    model = load_reference(path)
    model.set_experts_implementation("grouped_mm") if hasattr(model, "set_experts_implementation") else None
    C = model.config.canvas_length
    V = model.config.text_config.vocab_size

    class Counter:  # transformers' diffusion streamer hooks
        passes = 0

        def put(self, value):
            pass

        def put_draft(self, value=None, logits=None):
            Counter.passes += 1

        def end(self):
            pass

    def run():
        Counter.passes = 0
        torch.manual_seed(0)
        with torch.no_grad():
            # An EOS id outside the vocabulary never matches; a confidence bound of ~0 never stops early.
            model.generate(torch.tensor([ids]), max_new_tokens=canvases * C, max_denoising_steps=steps,
                           eos_token_id=[V + 7], confidence_threshold=1e-30, streamer=Counter())
        return Counter.passes

    return time_runs(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--canvas-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="ours,mlx-vlm,transformers")
    parser.add_argument("--no-openblas", action="store_true", help="Keep MLX's own (slow) CPU BLAS.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="medium")
    parser.add_argument("--no-breakdown", action="store_true", help="Skip timing our forward passes alone.")
    a = parser.parse_args()

    blas = reexec_with_openblas(not a.no_openblas)
    if blas.startswith("OpenBLAS"):
        blas += ", shared by every MLX engine"

    import numpy as np

    ids = np.random.default_rng(0).integers(5, a.vocab, a.prompt_tokens).tolist()
    engines = {"ours": ours, "mlx-vlm": mlx_vlm, "transformers": transformers_engine}
    rows, forward = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        geometry, described = GEOMETRIES[a.geometry]
        path = build(Path(tmp) / a.geometry, a.vocab, a.canvas_length, geometry)
        for name in a.engines.split(","):
            extra = {"breakdown": not a.no_breakdown} if name == "ours" else {}
            result = engines[name](path, ids, a.canvases, a.steps, a.repeat, **extra)
            if name == "ours":
                times, passes, forward = result
            else:
                times, passes = result
            rows[name] = {"ms_per_canvas": 1000 * statistics.median(times) / a.canvases,
                          "spread_ms": [1000 * min(times) / a.canvases, 1000 * max(times) / a.canvases],
                          "decoder_passes": passes}
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    expected = a.canvases * a.steps
    for name, row in rows.items():
        if row["decoder_passes"] != expected:
            raise SystemExit(f"{name} ran {row['decoder_passes']} decoder passes, expected {expected}: not the same work")
    if a.json:
        ms = {k: 1000 * v / a.canvases for k, v in forward.items()} if forward else None
        print(json.dumps({"blas": blas, "rows": rows, "ours_per_canvas_ms": ms}, indent=2))
        return
    print(f"{a.geometry} random checkpoint ({described}, vocab {a.vocab}), fp32, "
          f"canvas {a.canvas_length}, {a.steps} steps x {a.canvases} canvases, {a.prompt_tokens}-token prompt; "
          f"BLAS: {blas}")
    base = rows.get("ours", {}).get("ms_per_canvas")
    print(f"{'engine':<14}{'ms/canvas':>12}{'min':>10}{'max':>10}{'passes':>8}{'ours / it':>11}")
    for name, row in rows.items():
        ratio = f"{base / row['ms_per_canvas']:.2f}" if base else "-"
        lo, hi = row["spread_ms"]
        print(f"{name:<14}{row['ms_per_canvas']:>12.0f}{lo:>10.0f}{hi:>10.0f}{row['decoder_passes']:>8}{ratio:>11}")
    if base and forward:
        work, cap = 1000 * forward["forward"] / a.canvases, 1000 * forward["softcap"] / a.canvases
        print(f"ours, per canvas: {work:.0f} ms in the model's forward passes (MLX; prefill share, {a.steps} decoder "
              f"passes, commit pass, each timed alone), {cap:.0f} ms in the final softcap 30*tanh(x/30) "
              f"(the model's, through the backend's kernel: NumPy on the host on the CPU backend)")
        print(f"ours: time outside the forward passes (sampler, loop): {100 * (1 - (work + cap) / base):.1f}% of a "
              f"canvas with the softcap counted as forward, {100 * (1 - work / base):.1f}% counting it outside")


if __name__ == "__main__":
    main()
