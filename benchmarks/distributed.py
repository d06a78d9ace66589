"""The model split across two processes against one: memory per rank, bytes exchanged per decoder pass, and a
projection of the pass time on two Macs over Thunderbolt 5 for the released geometry.

    python benchmarks/distributed.py [--preset tiny] [--steps 3]

1. Writes a random checkpoint of `--preset`'s geometry (bench's presets), then times one denoising step
   (decoder pass, vocabulary statistics, categorical draw) in one process and in two local ring processes
   (hostfile on loopback, as `mlx.launch -n 2 --backend ring` runs them), each rank loading only its slices.
   Reported per rank: weights held, MLX peak memory, and every collective of one step with its payload,
   counted from the arrays the code hands to `mx.distributed` (wrapped while the step's graph is built).
2. Builds the released geometry (4-bit "mixed", as `bench --random full --q-bits 4`) lazily, splits it for
   rank 0 of 2 and traces one step's graph without evaluating anything: the same count for the real shapes,
   plus each rank's weights and FLOPs, from which the pass time on one and two Macs is projected under the
   printed assumptions (a roofline for compute, latency + bytes / bandwidth for the link).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffusiongemma import backend, distributed
from mlx_diffusiongemma.bench import PRESETS, _COMMON, _recipe, random_model
from mlx_diffusiongemma.model import Model, ModelArgs

OPS = ("all_sum", "all_gather", "all_max", "all_min")


@contextmanager
def counted(dry: bool = False):
    """Record (op, payload bytes) of every collective issued inside; `dry` issues none (shapes only)."""
    calls: list[tuple[str, int]] = []
    real = {op: getattr(mx.distributed, op) for op in OPS}

    def wrap(op):
        def f(x, *args, group=None, **kwargs):
            calls.append((op, x.nbytes))
            if not dry:
                return real[op](x, *args, group=group, **kwargs)
            return mx.concatenate([x] * group.size()) if op == "all_gather" else x
        return f

    for op in OPS:
        setattr(mx.distributed, op, wrap(op))
    try:
        yield calls
    finally:
        for op in OPS:
            setattr(mx.distributed, op, real[op])


def sent_per_rank(calls: list[tuple[str, int]], n: int) -> int:
    """Bytes one rank sends for these collectives on a ring of n (reduce-scatter + all-gather; gather: n - 1 parts)."""
    return sum(size * (n - 1) if op == "all_gather" else 2 * size * (n - 1) // n for op, size in calls)


def step_graph(model: Model, cache, x: mx.array, sc, choice: backend.Backend):
    """One denoising step as `generate.denoise_canvas` runs it: decoder pass, statistics, categorical draw."""
    logits = model.decode(x, cache, self_conditioning_probs=sc, softcap_kernel=choice.softcap)
    ent, total, argmax, probs, new_sc = choice.vocab_stats(logits, 0.8, model.dtype)
    u = mx.random.uniform(shape=x.shape, key=mx.random.key(0))
    return choice.categorical(probs, u), argmax, new_sc


def measure(model: Model, steps: int, n: int) -> dict:
    """Weights, peak memory, collectives of one step and median step time of a loaded model (or part)."""
    from mlx_diffusiongemma.generate import prefill

    load_peak = mx.get_peak_memory()
    rng = np.random.default_rng(0)
    V, C = model.args.vocab_size, model.args.canvas_length
    cache = model.make_cache()
    prefill(model, mx.array(rng.integers(0, V, (1, 32))), cache)
    x, sc, times = mx.array(rng.integers(0, V, (1, C))), None, []
    choice = backend.select()
    for i in range(steps + 1):
        tic = time.perf_counter()
        with counted() as calls:
            x, _, sc = step_graph(model, cache, x, sc, choice)
        mx.eval(x, sc)
        times.append(time.perf_counter() - tic)
    return {"weights": sum(v.nbytes for _, v in tree_flatten(model.parameters())), "load_peak": load_peak,
            "peak": mx.get_peak_memory(), "ms": 1000 * float(np.median(times[1:])), "calls": calls,
            "sent": sent_per_rank(calls, n)}


def write_checkpoint(preset: str, folder: Path) -> Path:
    from mlx_lm.utils import save_model

    model = random_model(preset, "float32")
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps({"text_config": {**PRESETS[preset], **_COMMON}}))
    return folder


def rank_main(folder: Path, out: Path, steps: int) -> None:
    from mlx_diffusiongemma.cluster import join, load_model_part

    group = join()
    mx.reset_peak_memory()
    result = measure(load_model_part(folder, group), steps, group.size())
    mine = mx.array([result["weights"], result["load_peak"], result["peak"]], dtype=mx.float32)
    every = np.array(mx.distributed.all_gather(mine[None], group=group)).tolist()
    if group.rank() == 0:
        result["ranks"] = every
        out.write_text(json.dumps(result))


def run_two(folder: Path, steps: int) -> dict:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hosts, out = folder / "hosts.json", folder / "two.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    cmd = [sys.executable, __file__, "--rank-run", str(folder), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, env={**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(r)})
             for r in range(2)]
    try:
        if any(p.wait(timeout=600) for p in procs):
            raise SystemExit("a rank failed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return json.loads(out.read_text())


class PlanGroup:
    """A stand-in for rank `rank` of `size` processes: enough to split a model and trace its graph."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _dims(linear) -> tuple[int, int]:
    """(input, output) width of a linear or switch-linear module (quantized ones unpacked)."""
    w = linear.weight
    return (w.shape[-1] * 32 // linear.bits if hasattr(linear, "scales") else w.shape[-1]), w.shape[-2]


def pass_flops(model: Model, C: int, ctx: int) -> float:
    """FLOPs of one decoder pass over a canvas of C after `ctx` cached positions, for this (part of the) model;
    experts at their expected share of the routed pairs (uniform routing)."""
    a, flops = model.args, 0.0
    for layer in model.layers:
        attn = layer.self_attn
        linears = [attn[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj") if n in attn]
        linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.router.proj]
        flops += sum(2 * C * i * o for i, o in map(_dims, linears))
        flops += 4 * C * (ctx + C) * attn.n_heads * attn.head_dim  # scores and weighted values
        ex = layer.experts
        share = ex.count / a.num_experts if isinstance(ex, distributed.ShardedExperts) else 1.0
        per_pair = sum(i * o for i, o in map(_dims, (ex.gate_up_proj, ex.down_proj)))
        flops += 2 * C * a.top_k_experts * share * per_pair
    dec = model.model.decoder
    sc = dec.self_conditioning
    flops += sum(2 * C * i * o for i, o in map(_dims, (sc.gate_proj, sc.up_proj, sc.down_proj)))
    rows = dec.embed_tokens.weight.shape[0]
    return flops + 2 * 2 * C * rows * a.hidden_size  # LM head and the self-conditioning embedding


def trace(preset: str, q_bits: int | None, n: int, ctx: int, dtype=mx.bfloat16) -> dict:
    """Weights, FLOPs and one step's collectives of rank 0 of n for a preset geometry, from a lazily built
    model whose graph is never evaluated (the expert layers' counts are not read: their all_sum is issued as is)."""
    import mlx.nn as nn

    args = ModelArgs(**PRESETS[preset], **_COMMON)
    model = Model(args)
    model.set_dtype(dtype)
    if q_bits:
        nn.quantize(model, class_predicate=lambda path, m: _recipe(path, m, q_bits))
    C = args.canvas_length
    whole = {"weights": sum(v.nbytes for _, v in tree_flatten(model.parameters())), "flops": pass_flops(model, C, ctx)}
    cuts, split = distributed.restructure(model, PlanGroup(n, 0))
    distributed.slice_parameters(model, cuts)
    part = {"weights": sum(v.nbytes for _, v in tree_flatten(model.parameters())), "flops": pass_flops(model, C, ctx)}
    real_call = distributed.ShardedExperts.__call__
    distributed.ShardedExperts.__call__ = lambda self, x, idx, w: mx.distributed.all_sum(
        mx.zeros((idx.shape[0], x.shape[-1]), dtype=mx.float32), group=self.group)
    distributed.activate(split)
    try:
        cache = model.make_cache()
        with counted(dry=True):
            model.encode(mx.zeros((1, ctx), dtype=mx.int32), cache)
        sc = mx.zeros((1, C, split.count), dtype=mx.float32)
        with counted(dry=True) as calls:
            step_graph(model, cache, mx.zeros((1, C), dtype=mx.int32), sc, backend.select(mx.gpu))
    finally:
        distributed.ShardedExperts.__call__ = real_call
        distributed.activate(None)
    syncs = sum(isinstance(layer.experts, distributed.ShardedExperts) for layer in model.layers)
    return {"whole": whole, "part": part, "calls": calls, "sent": sent_per_rank(calls, n), "syncs": syncs}


def _summary(calls: list[tuple[str, int]]) -> str:
    ops = {}
    for op, size in calls:
        count, total = ops.get(op, (0, 0))
        ops[op] = (count + 1, total + size)
    return ", ".join(f"{op} x{c} ({t / 1e3:.1f} kB)" for op, (c, t) in sorted(ops.items()))


def report_local(preset: str, one: dict, two: dict, traced: dict) -> None:
    print(f"== {preset} geometry (random fp32 checkpoint), one process vs 2 local ring processes (loopback)")
    print(f"{'':10}{'weights MB':>12}{'load peak MB':>14}{'step peak MB':>14}")
    print(f"{'1 process':10}{one['weights'] / 1e6:12.2f}{one['load_peak'] / 1e6:14.2f}{one['peak'] / 1e6:14.2f}")
    for r, (w, lp, p) in enumerate(two["ranks"]):
        print(f"{f'rank {r}':10}{w / 1e6:12.2f}{lp / 1e6:14.2f}{p / 1e6:14.2f}   "
              f"({w / one['weights']:.2f} / {p / one['peak']:.2f} of one process)")
    print(f"collectives per step (decoder pass + sampler): {len(two['calls'])}: {_summary(two['calls'])}")
    print(f"bytes each rank sends per step: {two['sent'] / 1e3:.1f} kB; traced from a lazy graph: "
          f"{traced['sent'] / 1e3:.1f} kB ({'the same' if [list(c) for c in traced['calls']] == two['calls'] else 'DIFFERENT'} calls)")
    print(f"step time here (2 cores shared, loopback TCP): {one['ms']:.1f} ms alone, {two['ms']:.1f} ms on 2 ranks")


def project(full: dict, a: argparse.Namespace) -> None:
    n = 2
    print(f"\n== released geometry (4-bit mixed, canvas 256 after {a.context} cached positions), rank 0 of {n}")
    w1, wr = full["whole"]["weights"], full["part"]["weights"]
    f1, fr = full["whole"]["flops"], full["part"]["flops"]
    print(f"weights: {w1 / 1e9:.2f} GB whole, {wr / 1e9:.2f} GB on rank 0 ({wr / w1:.2f}); "
          f"FLOPs per pass: {f1 / 1e12:.2f} T whole, {fr / 1e12:.2f} T on rank 0 ({fr / f1:.2f})")
    print(f"collectives per step: {len(full['calls'])}: {_summary(full['calls'])}; each rank sends "
          f"{full['sent'] / 1e6:.2f} MB; {full['syncs']} expert-count read-backs")
    flops, bw = a.tflops * 1e12 * a.compute_efficiency, a.mem_gbs * 1e9 * a.memory_efficiency
    print(f"assumptions: a Mac computes {a.tflops:g} TFLOPS x {a.compute_efficiency:g} and streams weights at "
          f"{a.mem_gbs:g} GB/s x {a.memory_efficiency:g} (M4 Max class), a pass costs max(compute, weight reads); "
          f"Thunderbolt 5 is 80 Gb/s (10 GB/s) per direction; compute and exchange do not overlap; each expert "
          f"count read-back stalls {a.sync_us:g} us")
    one = max(f1 / flops, w1 / bw)
    print(f"{'':34}{'compute ms':>11}{'link ms':>9}{'pass ms':>9}")
    print(f"{'one Mac':34}{1e3 * one:11.1f}{0:9.1f}{1e3 * one:9.1f}")
    for name, gbs, lat in (("two Macs, JACCL (RDMA over TB5)", a.jaccl_gbs, a.jaccl_us),
                           ("two Macs, ring (TCP over TB5)", a.ring_gbs, a.ring_us)):
        compute = max(fr / flops, wr / bw)
        link = len(full["calls"]) * lat * 1e-6 + full["sent"] / (gbs * 1e9) + full["syncs"] * a.sync_us * 1e-6
        print(f"{name + f' ({gbs:g} GB/s, {lat:g} us)':34}{1e3 * compute:11.1f}{1e3 * link:9.1f}"
              f"{1e3 * (compute + link):9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=[k for k in PRESETS if k != "full"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--context", type=int, default=1024, help="cached positions before the canvas (projection)")
    p.add_argument("--rank-run", type=Path, help=argparse.SUPPRESS)
    for flag, value in (("tflops", 17.0), ("compute-efficiency", 0.5), ("mem-gbs", 546.0),
                        ("memory-efficiency", 0.7), ("jaccl-gbs", 8.0), ("jaccl-us", 15.0), ("ring-gbs", 3.0),
                        ("ring-us", 100.0), ("sync-us", 50.0)):
        p.add_argument(f"--{flag}", type=float, default=value)
    a = p.parse_args()
    if a.rank_run:
        return rank_main(a.rank_run, a.rank_run / "two.json", a.steps)
    from mlx_diffusiongemma.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(a.preset, Path(tmp))
        mx.reset_peak_memory()
        one = measure(load_model(folder), a.steps, 1)
        two = run_two(folder, a.steps)
    report_local(a.preset, one, two, trace(a.preset, None, 2, 32, mx.float32))
    project(trace("full", 4, 2, a.context), a)


if __name__ == "__main__":
    main()
