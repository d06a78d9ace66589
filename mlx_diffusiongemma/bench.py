"""`mlx-diffusiongemma bench`: time prefill, denoising steps and commit passes on this machine.

Random weights with real shapes (`--random full` is the released 26B geometry) let anyone measure their Mac
without downloading; `--model` times a real checkpoint. Timings use the same functions as generation.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx.utils import tree_flatten

from .backend import prepare_model
from .errors import ContextLengthError, DiffusionGemmaError, UsageError
from .generate import denoise
from .loader import DTYPES
from .cache import _STEP
from .model import Model, ModelArgs
from .noise import MLXNoise

_COMMON = dict(rms_norm_eps=1e-6, use_bidirectional_attention="vision")
_COLUMNS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "num_experts",
            "top_k_experts", "moe_intermediate_size", "sliding_window", "canvas_length")
# One geometry per row, in _COLUMNS' order; "full" is the released google/diffusiongemma-26B-A4B-it text model.
_ROWS = {
    #         vocab  hidden  inter  layers heads kv  head  global gkv experts top-k moe  window canvas
    "tiny":   (1024,    64,   128,   6,    4,    2,  16,   32,    1,   8,    2,    32,   128,   64),
    "small":  (8192,   256,   512,   6,    4,    2,  64,  128,    1,   8,    2,   128,   256,  128),
    "medium": (32000,  512,  1024,   6,    8,    4,  64,  128,    2,  16,    4,   256,   512,  256),
    "full":   (262144, 2816, 2112,  30,   16,    8, 256,  512,    2, 128,    8,   704,  1024,  256),
}
PRESETS: dict[str, dict] = {name: dict(zip(_COLUMNS, row)) for name, row in _ROWS.items()}
PRESETS["full"]["max_position_embeddings"] = 262144


def _parameter_count(args: ModelArgs) -> tuple[int, int, int]:
    """Parameters of a geometry: (modules the "mixed" recipe keeps at 8 bits, modules it quantizes at the
    requested bits, modules that never quantize)."""
    h, v = args.hidden_size, args.vocab_size
    high, low = v * h, h * args.intermediate_size * 3  # embedding (= LM head); self-conditioning MLP
    for i in range(args.num_hidden_layers):
        d, kv = args.geometry(i)
        attn = h * args.num_attention_heads * d * 2 + h * kv * d * (2 if args.layer_types[i] != "full_attention" else 1)
        high += attn + 3 * h * args.intermediate_size + h * args.num_experts
        low += args.num_experts * 3 * h * args.moe_intermediate_size
    return high, low, args.num_hidden_layers * (8 * h + args.num_experts + 4 * 256)


def estimated_bytes(args: ModelArgs, dtype: mx.Dtype, q_bits: int | None) -> int:
    """Weight memory of a geometry: with `q_bits`, the "mixed" recipe `bench` builds (experts and
    self-conditioning at `q_bits`, the rest at 8 bits; one scale and bias per 64 weights)."""
    high, low, other = _parameter_count(args)
    width = dtype.size
    if not q_bits:
        return (high + low + other) * width
    return int(high * (1 + 2 * width / 64) + low * (q_bits / 8 + 2 * width / 64) + other * width)


# Copies of the [canvas, vocab] fp32 logits alive at once in a denoising step: the decoder's output, the
# vocabulary pass's buffers (scaled, exponentiated, self-conditioning probabilities) and the noise draw's.
LOGIT_COPIES = 6
MEMORY_FRACTION = 0.9  # the margin: an estimate above this share of the available memory is refused


def available_memory() -> int:
    """Memory a run may use: Metal's recommended working set, else the OS's available memory (Linux
    `MemAvailable`), else the physical memory."""
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return int(info["max_recommended_working_set_size"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def activation_bytes(args: ModelArgs, dtype: mx.Dtype, prompt_tokens: int, canvases: int) -> int:
    """Peak memory of a run besides the weights: the KV cache at its longest, the fp32 [canvas, vocab] logits
    and their copies, and one layer's attention scores and FFN activations at the widest pass (the prefill
    chunk or the canvas)."""
    from .generate import PREFILL_STEP

    C, h = args.canvas_length, args.hidden_size
    total = prompt_tokens + canvases * C
    width = max(min(prompt_tokens, PREFILL_STEP), C)  # tokens in the widest pass
    kv = args.kv_bytes(total, dtype.size, spare=_STEP)  # buffers grow in steps of _STEP positions
    # Scores and softmax of the widest layer: a full-attention one (the last layer always is), over everything.
    scores = 2 * args.num_attention_heads * width * (total + width) * 4
    ffn = width * (args.top_k_experts * (3 * args.moe_intermediate_size + h) + 3 * args.intermediate_size + 8 * h) * 4
    logits = LOGIT_COPIES * C * args.vocab_size * 4
    return kv + scores + ffn + logits


def build_bytes(args: ModelArgs, dtype: mx.Dtype, q_bits: int | None) -> int:
    """Peak memory while random weights are built a module at a time, each tensor drawn in fp32 and cast: the
    embedding first (alone), then every layer's largest tensor on top of what is built by then."""
    h, step = args.hidden_size, 4 + dtype.size
    heads_dim = args.num_attention_heads * max(args.head_dim, args.global_head_dim)
    in_layer = max(args.num_experts * 2 * args.moe_intermediate_size * h, h * args.intermediate_size, h * heads_dim)
    return max(args.vocab_size * h * step, estimated_bytes(args, dtype, q_bits) + in_layer * step)


def check_memory(what: str, need: int, detail: str, hint: str) -> None:
    """Refuse, in one line, a run whose estimated peak memory does not fit in the available memory with a
    margin (`MEMORY_FRACTION`)."""
    have = available_memory()
    if need > MEMORY_FRACTION * have:
        raise DiffusionGemmaError(
            f"{what} needs about {need / 2**30:.1f} GiB ({detail}) but this machine has {have / 2**30:.1f} GiB "
            f"available, and runs keep a {1 - MEMORY_FRACTION:.0%} margin; {hint}"
        )


def check_bench_context(args: ModelArgs, prompt_tokens: int, canvases: int) -> None:
    """Refuse a prompt and canvases that run past the model's context (positions beyond it are untrained)."""
    need = prompt_tokens + canvases * args.canvas_length
    if need > args.max_position_embeddings:
        raise ContextLengthError(
            f"--prompt-tokens {prompt_tokens} and --canvases {canvases} of {args.canvas_length} tokens need {need} "
            f"positions, more than the model's context of {args.max_position_embeddings}; lower --prompt-tokens "
            "or --canvases"
        )


def preset_args(preset: str) -> ModelArgs:
    if preset not in PRESETS:
        raise DiffusionGemmaError(f"unknown --random preset {preset!r}; use one of {', '.join(PRESETS)}")
    return ModelArgs(**PRESETS[preset], **_COMMON)


def random_model(preset: str, dtype: str = "bfloat16", q_bits: int | None = None) -> Model:
    """A model of a preset geometry with random weights, built and evaluated module by module (a progress bar
    on stderr); refused first when the weights cannot be built in the available memory."""
    args, target = preset_args(preset), DTYPES[dtype]
    weights = estimated_bytes(args, target, q_bits)
    check_memory(f"bench --random {preset} ({dtype}{f', {q_bits}-bit' if q_bits else ''})",
                 build_bytes(args, target, q_bits), f"{weights / 2**30:.1f} GiB of weights, built a module at a time",
                 "use a smaller preset" if q_bits else "use --q-bits 4 or a smaller preset")
    model = Model(args)  # random weights stay lazy until evaluated below
    model.set_dtype(target)
    if q_bits:
        nn.quantize(model, class_predicate=lambda path, m: _recipe(path, m, q_bits))
    _evaluate(model, f"building random {preset} weights")
    model.generation_config = {}
    return prepare_model(model)


def _evaluate(model: Model, label: str) -> None:
    """Evaluate lazy weights one module at a time (keeping the peak near the final size), with a progress bar
    on stderr: the full geometry takes minutes."""
    from tqdm import tqdm

    dec = model.model.decoder
    modules = [dec.embed_tokens, *model.layers, dec.self_conditioning]
    for module in tqdm(modules, desc=label, unit="module", leave=False, file=sys.stderr, mininterval=0.5):
        mx.eval(module.parameters())
    mx.eval(model.parameters())


def _recipe(path: str, module: nn.Module, bits: int):
    """The community mix `convert` writes by default: experts and self-conditioning at `bits`, the rest 8."""
    from .quantization import recipe_setting

    if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 64:
        return False
    return recipe_setting(path, "mixed", {"group_size": 64, "bits": bits, "mode": "affine"})


@dataclass
class BenchResult:
    prefill_tps: float
    ms_per_step: float
    ms_per_commit: float
    ms_per_canvas: float
    decode_tps: float
    steps_per_canvas: float  # decoder passes per canvas (mean over the run's canvases)
    decoder_passes: int  # in the whole run: canvases x steps per canvas
    tokens_per_canvas: float  # committed tokens per canvas (verify "ar": what each verify accepted)
    peak_memory_gb: float


def run_once(model: Model, drafter, prompt_tokens: int, canvases: int, seed: int) -> BenchResult:
    """Run the denoising loop itself on a random prompt for `canvases` canvases, timing each event it yields.

    A decoder pass ends at its draft event, a commit (or verify) pass at its encode event, a canvas at its
    commit event. No EOS, so every canvas runs; under verify "ar" a canvas commits what its verify accepts.
    """
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(0, model.args.vocab_size, (1, prompt_tokens)))
    times: dict[str, list[float]] = {"encode": [], "draft": [], "commit": []}
    committed = 0
    mx.reset_peak_memory()
    last = canvas_start = time.perf_counter()
    for event in denoise(model, ids, drafter, MLXNoise(seed), canvases, eos_ids=[], pad_id=None):
        now = time.perf_counter()
        times[event.kind].append(now - (canvas_start if event.kind == "commit" else last))
        if event.kind == "commit":
            committed += event.tokens.shape[1]
        if event.kind == "commit" or (event.kind == "encode" and len(times["encode"]) == 1):
            canvas_start = now  # a canvas's time runs from the prefill or the previous commit
        last = now
    prefill_s, commit_s = times["encode"][0], times["encode"][1:]
    return BenchResult(
        prefill_tps=prompt_tokens / prefill_s,
        ms_per_step=1000 * statistics.median(times["draft"]),
        ms_per_commit=1000 * statistics.median(commit_s) if commit_s else float("nan"),
        ms_per_canvas=1000 * statistics.median(times["commit"]),
        decode_tps=committed / sum(times["commit"]),
        steps_per_canvas=len(times["draft"]) / len(times["commit"]),
        decoder_passes=len(times["draft"]),
        tokens_per_canvas=committed / len(times["commit"]),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


@dataclass
class BatchResult:
    aggregate_tps: float  # committed tokens of every request / wall time of the whole batch
    latency_s: float  # median per request: from submission (all at once) to its last commit
    max_latency_s: float
    ms_per_step: float  # one batched decoder pass (canvas time / passes)
    ms_per_commit: float  # one row's commit (encoder) pass: rows commit when their own canvas is done
    prefill_s: float  # all prompts, each alone
    rows_per_expert: float  # canvas rows each expert sees per decoder pass (B x C x top-k / experts)
    peak_memory_gb: float
    estimated_gb: float  # the engine's estimate for the batch (what a memory budget is checked against)


def run_batch(model: Model, drafter, prompt_tokens: int | list[int], canvases: int, batch: int,
              seed: int) -> BatchResult:
    """`batch` random prompts submitted together to the batch engine, `canvases` canvases each (no EOS).

    `prompt_tokens` is one length for all, or one per prompt (rows of different lengths: padding and masks).
    """
    from .batch import BatchDenoiser

    C, V = model.args.canvas_length, model.args.vocab_size
    lengths = prompt_tokens if isinstance(prompt_tokens, list) else [prompt_tokens] * batch
    engine = BatchDenoiser(model, drafter, eos_ids=[], pad_id=None)
    rng = np.random.default_rng(seed)
    for i in range(batch):
        engine.submit(rng.integers(0, V, lengths[i]).tolist(), MLXNoise(seed * 1000 + i), canvases * C)
    prefill_s, admitted, latencies, estimate = 0.0, 0.0, [], 0
    mx.reset_peak_memory()
    tic = time.perf_counter()
    while not engine.idle:
        for request, event in engine.step():
            now = time.perf_counter()
            if event.kind == "admit":  # each prompt's prefill runs alone, between its admit and its encode
                admitted = now
            elif event.kind == "encode" and event.canvas == 0:
                prefill_s += now - admitted
            elif event.kind == "commit" and event.canvas + 1 == canvases:
                latencies.append(now - tic)
            estimate = max(estimate, engine.batch_bytes())
    wall, timing = time.perf_counter() - tic, engine.timing
    latencies.sort()
    return BatchResult(
        aggregate_tps=batch * canvases * C / wall,
        latency_s=statistics.median(latencies),
        max_latency_s=latencies[-1],
        ms_per_step=1000 * (wall - prefill_s - timing["commit_seconds"]) / max(timing["decoder_passes"], 1),
        ms_per_commit=1000 * timing["commit_seconds"] / max(timing["commits"], 1),
        prefill_s=prefill_s,
        rows_per_expert=batch * C * model.args.top_k_experts / model.args.num_experts,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        estimated_gb=estimate / 1e9,
    )


def summarize(results: list[BenchResult] | list[BatchResult]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over repeats."""
    out = {}
    for name in type(results[0]).__dataclass_fields__:
        values = [getattr(r, name) for r in results]
        out[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def format_report(summary: dict[str, dict[str, float]], label: str) -> str:
    s = summary

    def fig(name, fmt):
        v = s[name]
        return f"{v['median']:{fmt}} (min {v['min']:{fmt}}, max {v['max']:{fmt}})"

    return "\n".join([
        f"{label}",
        f"prefill:        {fig('prefill_tps', '.1f')} tokens/s",
        f"decoder step:   {fig('ms_per_step', '.1f')} ms",
        f"commit pass:    {fig('ms_per_commit', '.1f')} ms",
        f"canvas:         {fig('ms_per_canvas', '.1f')} ms",
        f"decode:         {fig('decode_tps', '.1f')} tokens/s (committed tokens / canvas time)",
        f"tokens/canvas:  {fig('tokens_per_canvas', '.1f')} (verify \"ar\": what each verify accepted)",
        f"peak memory:    {s['peak_memory_gb']['max']:.3f} GB",
    ])


def format_batch_report(summary: dict[str, dict[str, float]], label: str) -> str:
    s = summary

    def fig(name, fmt, scale=1.0):
        v = s[name]
        return f"{scale * v['median']:{fmt}} (min {scale * v['min']:{fmt}}, max {scale * v['max']:{fmt}})"

    return "\n".join([
        f"{label}",
        f"aggregate:       {fig('aggregate_tps', '.1f')} tokens/s (every request's tokens / batch wall time)",
        f"latency:         {fig('latency_s', '.2f')} s per request, median over requests "
        f"(slowest request {s['max_latency_s']['median']:.2f} s)",
        f"decoder step:    {fig('ms_per_step', '.1f')} ms per batched pass",
        f"commit pass:     {fig('ms_per_commit', '.1f')} ms per row (each row commits alone)",
        f"prefill:         {fig('prefill_s', '.2f')} s (each prompt alone)",
        f"rows per expert: {s['rows_per_expert']['median']:.0f} per decoder pass",
        f"peak memory:     {s['peak_memory_gb']['max']:.3f} GB (weights included; the engine's estimate for "
        f"the batch without weights: {s['estimated_gb']['max']:.3f} GB)",
    ])


def _check_run_memory(args: ModelArgs, dtype, weights: int, prompt_tokens: int, canvases: int, what: str,
                      hint: str) -> None:
    act = activation_bytes(args, dtype, prompt_tokens, canvases)
    check_memory(f"bench {what}", weights + act,
                 f"{weights / 2**30:.1f} GiB of weights + {act / 2**30:.1f} GiB for the KV cache, logits and "
                 "activations", f"{hint}, or fewer --prompt-tokens or --canvases")


def _check_bench_args(model_path, random, q_bits, prompt_tokens, canvases, steps, drafter, repeat, adapter_path,
                      batch) -> None:
    """Refuse bad flags in one line, before any weights are built or read."""
    if (model_path is None) == (random is None):
        raise DiffusionGemmaError("pass exactly one of --model PATH and --random PRESET")
    for flag, value in (("--canvases", canvases), ("--repeat", repeat), ("--prompt-tokens", prompt_tokens)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1 (got {value})")
    if steps is not None and steps < 0:
        raise UsageError(f"--steps must be 0 (the drafter's own rules) or more (got {steps})")
    if adapter_path is not None and random is not None:
        raise UsageError("--adapter-path needs --model: adapters belong to the checkpoint they were trained on")
    if q_bits is not None:
        from .quantization import check_quantization

        check_quantization(q_bits, 64)  # the group size `_recipe` builds with
    if batch > 1:
        from .batch import check_batch_drafter
        from .drafter import load_drafter_config

        fields = load_drafter_config(drafter)
        check_batch_drafter(fields["name"], fields["verify"])


def _bench_model(model_path, random, dtype, q_bits, prompt_tokens, canvases, adapter_path,
                 group=None) -> tuple[Model, str]:
    """The random preset built, or the checkpoint loaded (with its adapters), once its memory is known to fit;
    and its label for the report. With a `group` (under mlx.launch), this rank's part: a checkpoint's slices
    read alone, or random weights built whole (the same on every rank) and then split."""
    if random is not None:
        args, dtype = preset_args(random), dtype or "bfloat16"
        if dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        check_bench_context(args, prompt_tokens, canvases)
        label = f"random {random} ({dtype}{f', {q_bits}-bit' if q_bits else ''})"
        weights = estimated_bytes(args, DTYPES[dtype], q_bits)
        _check_run_memory(args, DTYPES[dtype], weights, prompt_tokens, canvases, f"--{label}",
                          "use a smaller preset" if q_bits else "use --q-bits 4 or a smaller preset")
        if group is None:
            return random_model(random, dtype, q_bits), label
        from .distributed import shard

        mx.random.seed(0)  # every rank builds the same weights before keeping its part
        return shard(random_model(random, dtype, q_bits), group), f"{label}{_split_label(group)}"
    from .loader import load_model, resolve_path

    if group is not None:
        from .cluster import load_model_part

        model = load_model_part(resolve_path(model_path), group, dtype)
        check_bench_context(model.args, prompt_tokens, canvases)
        return model, f"{model_path}{_split_label(group)}"
    model, label = load_model(resolve_path(model_path), dtype=dtype, lazy=True), model_path
    check_bench_context(model.args, prompt_tokens, canvases)
    if adapter_path is not None:
        from .lora import load_adapters

        config = load_adapters(model, adapter_path)
        label += f" + LoRA rank {config['rank']} from {adapter_path}"
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))  # lazy: nothing read yet
    _check_run_memory(model.args, model.dtype, weights, prompt_tokens, canvases, model_path,
                      "use a quantized conversion (`convert -q`)")
    _evaluate(model, f"loading {model_path}")
    return model, label


def _split_label(group) -> str:
    return f", split across {group.size()} processes (rank 0's figures)"


def bench(
    model_path: str | None, random: str | None, dtype: str | None, q_bits: int | None, prompt_tokens: int,
    canvases: int, steps: int | None, drafter: str, repeat: int, as_json: bool, adapter_path: str | None = None,
    batch: int = 1,
) -> str:
    """Build or load the model (with LoRA adapters from `adapter_path`), warm up once, time `repeat` runs;
    return the report (text or JSON). `batch` > 1 times that many prompts denoised together instead. Under
    `mlx.launch` each rank times its part of the model and only rank 0 returns a report ("" elsewhere)."""
    import json

    from .cluster import join, together
    from .drafter import drafter_for

    _check_bench_args(model_path, random, q_bits, prompt_tokens, canvases, steps, drafter, repeat, adapter_path,
                      batch)
    group = join()

    def build():
        if group is not None and (batch > 1 or adapter_path is not None):
            raise UsageError("--batch and --adapter-path are not supported across processes; drop them under "
                             "mlx.launch")
        return _bench_model(model_path, random, dtype, q_bits, prompt_tokens, canvases, adapter_path, group)

    model, label = build() if group is None else together(group, build)
    overrides = {"max_denoising_steps": steps, "adaptive_stop": False} if steps else None
    config = drafter_for(model, drafter, overrides)
    if batch > 1:
        return _bench_batch(model, config, label, prompt_tokens, canvases, batch, repeat, as_json)
    run_once(model, config, prompt_tokens, 1, seed=0)  # warm-up: compilation and allocation
    results = [run_once(model, config, prompt_tokens, canvases, seed=i) for i in range(repeat)]
    if group is not None and group.rank() > 0:
        return ""  # rank 0 reports
    summary = summarize(results)
    label += f", {prompt_tokens}-token prompt, {canvases} canvases x {summary['steps_per_canvas']['median']:g} " \
             f"steps, drafter {config.name}, {mx.default_device()}"
    if as_json:
        return json.dumps({"label": label, "prompt_tokens": prompt_tokens, "canvases_per_run": canvases,
                           **summary}, indent=2)
    return format_report(summary, label)


def _bench_batch(model, config, label, prompt_tokens, canvases, batch, repeat, as_json) -> str:
    import json

    run_batch(model, config, prompt_tokens, 1, batch, seed=0)  # warm-up
    summary = summarize([run_batch(model, config, prompt_tokens, canvases, batch, seed=i) for i in range(repeat)])
    label += f", {batch} prompts of {prompt_tokens} tokens together, {canvases} canvases each, drafter " \
             f"{config.name}, {mx.default_device()}"
    if as_json:
        return json.dumps({"label": label, "batch": batch, **summary}, indent=2)
    return format_batch_report(summary, label)
