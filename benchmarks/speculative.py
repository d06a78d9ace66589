"""The speculative commit on the toy model: accuracy and model passes per solved prompt, drafter by drafter.

    python benchmarks/speculative.py                 # 500 held-out prompts per task (about 25 minutes here)
    python benchmarks/speculative.py --prompts 50    # a quick look

For every drafter and task it runs the held-out prompts (never seen in training) through `stream_generate`
and reports the exact-answer accuracy, decoder passes per prompt, encoder passes per prompt (the prefill, then
each commit or verify pass), all model passes over the prompts solved, and that figure as a share of
`reference`'s. It then times one verify pass against one decoder pass on the toy and on the random "medium"
geometry (hidden 512, 6 layers, 16 experts, vocabulary 32000, canvas 256), both fp32 on MLX's CPU backend
(with OpenBLAS interposed when cmeel-openblas is installed, as in benchmarks/compare.py).
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

from mlx_diffusiongemma import load  # noqa: E402
from mlx_diffusiongemma.bench import random_model  # noqa: E402
from mlx_diffusiongemma.tasks import TASKS  # noqa: E402
from mlx_diffusiongemma.toy import evaluate  # noqa: E402

# `fast` is left out: the README's table already has it, and it changes nothing here.
DRAFTERS = ("reference", "speculative", str(Path(__file__).with_name("speculative_relaxed.json")))


def accuracy_table(model, tokenizer, prompts: int, drafters=DRAFTERS) -> list[str]:
    rows = ["drafter             task    accuracy  decoder/prompt  encoder/prompt  passes/solved  vs reference  "
            "tokens/verify"]
    baseline = {}
    for drafter in drafters:
        name = Path(drafter).stem.replace("_", "-")
        for task in TASKS:
            tic = time.perf_counter()
            r = evaluate(model, tokenizer, task, prompts, drafter=drafter)
            baseline.setdefault(task, r["passes_per_solved"])
            encoder = r["mean_model_passes"] - r["mean_steps"]
            per_verify = "-" if r["accepted_per_verify"] is None else f"{r['accepted_per_verify']:.2f}"
            rows.append(
                f"{name:<19} {task:<7} {100 * r['accuracy']:7.1f}%  {r['mean_steps']:14.2f}  {encoder:14.2f}  "
                f"{r['passes_per_solved']:13.2f}  {r['passes_per_solved'] / baseline[task]:11.2f}x  "
                f"{per_verify:>13}   ({time.perf_counter() - tic:.0f} s)"
            )
            print(rows[-1], flush=True)
    return rows


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def pass_costs(model, label: str, prompt_tokens: int, repeat: int = 5) -> str:
    """One decoder pass over a canvas against one verify pass (the encoder with its logits) over it."""
    C, V = model.args.canvas_length, model.args.vocab_size
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, prompt_tokens))), cache)
    canvas = mx.array(rng.integers(0, V, (1, C)))

    def decoder():
        mx.eval(model.decode(canvas, cache))

    def verify(logits="all"):
        for c in cache:
            c.provisional()
        out = model.encode(canvas, cache, logits=logits)
        mx.eval([c.keys for c in cache] + ([] if out is None else [out]))
        for c in cache:
            c.settle(1)  # roll back to one accepted token (the worst case: the K/V copy is done)

    dec, ver, commit = _median_ms(decoder, repeat), _median_ms(verify, repeat), _median_ms(lambda: verify(None), repeat)
    return (f"{label}: decoder pass {dec:.1f} ms, verify pass {ver:.1f} ms ({ver / dec:.2f}x a decoder pass), "
            f"plain commit pass {commit:.1f} ms ({commit / dec:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=500,
                        help="held-out prompts per task (at most 2000; 0: only the pass costs)")
    parser.add_argument("--skip-costs", action="store_true", help="only the accuracy table")
    parser.add_argument("--model", default="toy", help="a toy-format checkpoint folder (default: the bundled toy)")
    parser.add_argument("--drafters", type=lambda v: v.split(","), default=list(DRAFTERS),
                        help="comma-separated drafters, the first being the baseline (default: all three)")
    parser.add_argument("--no-openblas", action="store_true", help="keep MLX's own (slow) CPU BLAS")
    args = parser.parse_args()
    blas = reexec_with_openblas(not args.no_openblas)
    model, tokenizer = load(args.model)
    print(f"{args.model} model, {args.prompts} held-out prompts per task, seeds 0..{args.prompts - 1}, "
          f"{mx.default_device()}, {blas}")
    if args.prompts > 0:
        rows = accuracy_table(model, tokenizer, args.prompts, args.drafters)
        print("\n" + "\n".join(rows))
    if not args.skip_costs:
        print(pass_costs(model, "toy (canvas 24, 19-token prompt)", 19))
        print(pass_costs(random_model("medium", "float32"), "random medium (canvas 256, 100-token prompt)", 100))


if __name__ == "__main__":
    main()
