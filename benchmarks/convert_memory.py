"""Peak memory and throughput of `mlx_diffusiongemma.convert` on a multi-GB checkpoint in the released layout.

    python benchmarks/convert_memory.py [--size-gb 6] [--workdir DIR] [--keep]

Writes a synthetic checkpoint of at least `--size-gb` GiB: the released 26B-A4B geometry (hidden 2816, vocab
262144, 128 experts of width 704, sliding layers with 8 x 256 kv heads and v_proj, full layers with 2 x 512
and no v_proj, hub config.json with `global_head_dim` / `num_global_key_value_heads`) but only as many layers
as the size needs (the last one full attention), bf16 random values (normal, std 0.02), the released key
names, a few vision-tower tensors and the encoder `layer_scalar`s the converter must skip or keep, in shards
of at most 2 GB with a `model.safetensors.index.json`. The values are streamed to disk from a 64 MiB pool of
random bf16 values read at random offsets, so generating the checkpoint needs little memory.

Then, in the same run:
  1. a plain copy of the shards (shutil.copyfile into a scratch folder, then deleted): the I/O baseline;
  2. a bf16 conversion (no quantization) in a subprocess: wall time and peak RSS (wait4's ru_maxrss);
  3. a 4-bit conversion (mixed recipe) likewise.
Nothing is dropped from the page cache: the source was just written, so every pass reads it from memory
(on a machine with enough RAM) and writes into the page cache. Each pass starts after an (untimed) sync, so
none is slowed down by the write-back of the previous one's output.

Targets: peak RSS <= 2 x largest tensor + 1 GiB for each conversion; bf16 conversion throughput (source
bytes / wall time) >= 0.3 x the copy's. The big files are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GiB = 1024**3
SHARD_CAP = 2 * 10**9

H, V, I, E, IM, NH = 2816, 262144, 2112, 128, 704, 16
SLIDING = dict(d=256, kv=8)
FULL = dict(d=512, kv=2)
VISION_H, VISION_I = 1152, 4304


def text_config(num_layers: int) -> dict:
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    return {
        "model_type": "diffusion_gemma_text",
        "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": num_layers,
        "num_attention_heads": NH, "num_key_value_heads": SLIDING["kv"], "head_dim": SLIDING["d"],
        "global_head_dim": FULL["d"], "num_global_key_value_heads": FULL["kv"],
        "num_experts": E, "top_k_experts": 8, "moe_intermediate_size": IM, "sliding_window": 1024,
        "layer_types": layer_types, "use_bidirectional_attention": "vision",
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "attention_dropout": 0.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "initializer_range": 0.02, "dtype": "bfloat16",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    }


def config(num_layers: int) -> dict:
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": 256,
        "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880,
        "eos_token_id": [1, 106], "initializer_range": 0.02, "tie_word_embeddings": True, "dtype": "bfloat16",
        "text_config": text_config(num_layers),
        "vision_config": {
            "model_type": "gemma4_vision", "hidden_size": VISION_H, "intermediate_size": VISION_I,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
            "global_head_dim": 72, "default_output_length": 280, "pooling_kernel_size": 3,
            "use_clipped_linears": False, "standardize": True,
        },
        "transformers_version": "5.8.0.dev0",
    }


def tensors(num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every stored key of the released layout (spec 2.2/2.3) with its shape, for `num_layers` layers."""
    out = {"model.decoder.embed_tokens.weight": (V, H), "model.decoder.norm.weight": (H,),
           "model.decoder.self_conditioning.pre_norm.weight": (H,),
           "model.decoder.self_conditioning.gate_proj.weight": (I, H),
           "model.decoder.self_conditioning.up_proj.weight": (I, H),
           "model.decoder.self_conditioning.down_proj.weight": (H, I)}
    for i in range(num_layers):
        full = i == num_layers - 1
        d, kv = (FULL if full else SLIDING).values()
        p = f"model.decoder.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (NH * d, H), p + "self_attn.k_proj.weight": (kv * d, H),
            p + "self_attn.o_proj.weight": (H, NH * d), p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
            p + "router.proj.weight": (E, H), p + "router.scale": (H,), p + "router.per_expert_scale": (E,),
            p + "experts.gate_up_proj": (E, 2 * IM, H), p + "experts.down_proj": (E, H, IM),
            p + "layer_scalar": (1,),
        })
        if not full:
            out[p + "self_attn.v_proj.weight"] = (kv * d, H)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_2", "post_feedforward_layernorm"):
            out[p + norm + ".weight"] = (H,)
        out[f"model.encoder.language_model.layers.{i}.layer_scalar"] = (1,)
    # A few vision tensors (the converter must skip them).
    vt = "model.encoder.vision_tower."
    out.update({
        vt + "patch_embedder.input_proj.weight": (VISION_H, 768),
        vt + "encoder.layers.0.self_attn.q_proj.linear.weight": (VISION_H, VISION_H),
        vt + "encoder.layers.0.self_attn.k_proj.linear.weight": (VISION_H, VISION_H),
        vt + "encoder.layers.0.self_attn.v_proj.linear.weight": (VISION_H, VISION_H),
        vt + "encoder.layers.0.mlp.gate_proj.linear.weight": (VISION_I, VISION_H),
        vt + "encoder.layers.0.mlp.down_proj.linear.weight": (VISION_H, VISION_I),
        vt + "encoder.layers.0.input_layernorm.weight": (VISION_H,),
        "model.encoder.embed_vision.embedding_projection.weight": (H, VISION_H),
    })
    return out


def nbytes(shape) -> int:
    return int(np.prod(shape)) * 2


def write_checkpoint(folder: Path, size: int, seed: int = 0) -> tuple[int, int, int]:
    """Write the checkpoint; return (total tensor bytes, largest tensor bytes, layers)."""
    layers = 2
    while sum(map(nbytes, tensors(layers).values())) < size:
        layers += 1
    spec = tensors(layers)
    keys = sorted(spec)
    shards, current, used = [], [], 0
    for k in keys:
        if current and used + nbytes(spec[k]) > SHARD_CAP:
            shards.append(current)
            current, used = [], 0
        current.append(k)
        used += nbytes(spec[k])
    shards.append(current)

    rng = np.random.default_rng(seed)
    pool_n = 32 << 20
    x = rng.standard_normal(pool_n, dtype=np.float32) * np.float32(0.02)
    pool = (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 = upper half of the fp32 bits (no NaN)
    del x
    chunk = 8 << 20
    folder.mkdir(parents=True)
    weight_map = {}
    for s, names in enumerate(shards, 1):
        name = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k in names:
            header[k] = {"dtype": "BF16", "shape": list(spec[k]), "data_offsets": [off, off + nbytes(spec[k])]}
            off += nbytes(spec[k])
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k in names:
                left = nbytes(spec[k]) // 2
                while left:
                    n = min(chunk, left)
                    start = int(rng.integers(0, pool_n - n + 1))
                    f.write(pool[start:start + n].data)
                    left -= n
        weight_map.update({k: name for k in names})
    total = sum(map(nbytes, spec.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    generation = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50], "max_new_tokens": 256,
                  "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
                  "confidence_threshold": 0.005,
                  "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return total, max(map(nbytes, spec.values())), layers


def timed_copy(src: Path, scratch: Path) -> float:
    scratch.mkdir()
    os.sync()  # start with no dirty pages, as each conversion does
    tic = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, scratch / f.name)
    elapsed = time.perf_counter() - tic
    shutil.rmtree(scratch)
    return elapsed


CHILD = """
import sys, time
from mlx_diffusiongemma.convert import convert
kw = dict(quantize=True) if sys.argv[3] == "4bit" else dict(dtype="bfloat16")
tic = time.perf_counter()
convert(sys.argv[1], sys.argv[2], progress=lambda d, t: None, **kw)
print(f"{time.perf_counter() - tic:.3f}")
"""


def timed_convert(src: Path, dst: Path, kind: str) -> tuple[float, float, int, int]:
    """(wall s, convert() s, peak RSS bytes, output bytes) of one conversion in a fresh process."""
    os.sync()
    tic = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), kind], stdout=subprocess.PIPE)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - tic
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} conversion failed (exit {proc.returncode})")
    inner = float(out.decode().strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    return wall, inner, usage.ru_maxrss * 1024, size  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=6.0, help="minimum checkpoint size in GiB (default 6)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the converted folders")
    args = parser.parse_args()
    if sys.platform != "linux":
        raise SystemExit("this benchmark reads peak RSS the Linux way (wait4 ru_maxrss in KiB)")

    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="dg-convert-memory-"))
    else:
        work = args.workdir.expanduser().absolute()
        work.mkdir(parents=True, exist_ok=True)
    src = work / "checkpoint"
    made = [src, work / "bf16", work / "4bit", work / "copy"]
    clash = [str(p) for p in made if p.exists()]
    if clash:
        raise SystemExit(f"{', '.join(clash)} already exist(s); choose another --workdir")
    ok = False
    try:
        tic = time.perf_counter()
        total, largest, layers = write_checkpoint(src, int(args.size_gb * GiB))
        n_shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {src} ({layers} layers, {n_shards} shards) written in {time.perf_counter() - tic:.1f} s")
        print(f"checkpoint size: {total / GiB:.2f} GiB ({total / 1e9:.2f} GB)")
        print(f"largest tensor: {largest} bytes ({largest / GiB:.3f} GiB)")
        target = 2 * largest + GiB
        print(f"peak RSS target: 2 x largest + 1 GiB = {target / GiB:.2f} GiB")

        copy_s = timed_copy(src, work / "copy")
        copy_rate = total / copy_s / 1e9
        print(f"plain copy: {copy_s:.2f} s, {copy_rate:.2f} GB/s (page cache not dropped)")

        ok = True
        for kind, floor in (("bf16", 0.3), ("4bit", None)):
            dst = work / kind
            wall, inner, peak, size = timed_convert(src, dst, kind)
            rate = total / wall / 1e9
            mem_ok = peak <= target
            line = (f"convert {kind}: wall {wall:.2f} s (convert() {inner:.2f} s), output {size / GiB:.2f} GiB, "
                    f"peak RSS {peak / GiB:.2f} GiB [{'met' if mem_ok else 'NOT met'}: <= {target / GiB:.2f}], "
                    f"{rate:.2f} GB/s = {rate / copy_rate:.2f} x copy")
            if floor is not None:
                line += f" [{'met' if rate / copy_rate >= floor else 'NOT met'}: >= {floor} x copy]"
                ok &= rate / copy_rate >= floor
            ok &= mem_ok
            print(line, flush=True)
            if not args.keep:
                shutil.rmtree(dst)
        print("all targets met" if ok else "SOME TARGETS NOT MET")
    finally:
        if not args.keep:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
