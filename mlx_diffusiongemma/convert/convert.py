"""Convert a DiffusionGemma checkpoint to a text-only MLX folder (bf16/fp16/fp32, optionally quantized).

The conversion streams: every output tensor's dtype, shape and place in the output shards is planned from the
source safetensors headers before any data is read; then each tensor is read, cast and (optionally) quantized
at most 64 MiB of rows at a time and written in place, and tensors whose bytes do not change are copied file
to file. Memory use stays flat (a few hundred MB) whatever the tensor and shard sizes. The output is built
in a hidden temporary folder beside the target and renamed into place only once complete, so an interrupted
or failed run never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ..checkpoint import DTYPE_NAMES, check_safetensors, copy_side_files, resolve_path, weight_files
from ..errors import CheckpointError, ConversionOptionError, DiffusionGemmaError
from ..folders import build_folder
from ..quantization import check_quantization, recipe_setting
from . import shards as shard_files
from .shards import Out, ReadError, ShardFiles, copy_range, plan_shards, read_exact

MAX_SHARD_BYTES = 5 * 1024**3  # the usual Hub cap per safetensors file
# Test-only hooks: a smaller shard cap, and a pause after each tensor (to interrupt a run mid-way).
_SHARD_ENV = "MLX_DIFFUSIONGEMMA_CONVERT_SHARD_BYTES"
_DELAY_ENV = "MLX_DIFFUSIONGEMMA_CONVERT_DELAY"

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _check_options(dtype, quantize, q_bits, q_group_size, q_mode, q_recipe) -> None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConversionOptionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    if quantize:
        check_quantization(q_bits, q_group_size, q_mode, q_recipe)


def _source_dtype(headers: dict[str, dict]) -> str:
    """The checkpoint's float dtype, read from the safetensors headers (that of the embedding, else the
    first floating tensor)."""
    found = None
    for header in headers.values():
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if name and key.endswith("embed_tokens.weight"):
                return name
            found = found or name
    return found or "float32"


def _write_config(src_config: dict, dst: Path, dtype: str, qconfig: dict | None) -> None:
    config = {k: v for k, v in src_config.items() if k not in ("quantization", "quantization_config")}
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = dict(config["text_config"])
        if "dtype" in config["text_config"]:
            config["text_config"]["dtype"] = dtype
    # The vision tower is dropped: say so, and keep no vision config that a loader would try to build.
    config["vision_config"] = None
    config["text_only"] = True
    if qconfig is not None:
        config["quantization"] = qconfig
        config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# safetensors dtype codes <-> MLX dtypes (what a checkpoint may hold, what we write).
_ST_TO_MX = {
    "BOOL": "bool_", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64",
}
class _Unit:
    """One source tensor, where its bytes are, and the output tensors it becomes.

    kind: "copy" (bytes unchanged), "cast" (float dtype changed) or "quantize".
    """

    __slots__ = ("key", "file", "offset", "code", "shape", "kind", "setting", "target", "outs")

    def __init__(self, key, file, offset, code, shape, kind, setting, target, outs):
        self.key, self.file, self.offset, self.code, self.shape = key, file, offset, code, shape
        self.kind, self.setting, self.target, self.outs = kind, setting, target, outs


def _mx_dtype(code: str):
    import mlx.core as mx

    return getattr(mx, _ST_TO_MX[code])


def _st_code(dtype) -> str:
    import mlx.core as mx

    for code, name in _ST_TO_MX.items():
        if getattr(mx, name, None) == dtype:
            return code
    raise CheckpointError(f"cannot store dtype {dtype} in safetensors")


def _rows_cols(shape: tuple) -> tuple[int, int]:
    """A tensor seen as a row-major matrix: (product of the leading dims, last dim)."""
    if len(shape) == 0:
        return 1, 1
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows, shape[-1]


def _progress_bar() -> Callable[[int, int], None] | None:
    """A tqdm bar on stderr when it is a terminal (nothing otherwise), as `progress` expects it."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(desc="converting", unit="tensor", file=sys.stderr, mininterval=0.1)

    def show(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return show


def _write_unit(unit: _Unit, src_fd: int, shards: ShardFiles, buf: bytearray) -> None:
    """Write one source tensor's outputs, reading, casting and quantizing at most `CHUNK_BYTES` of it at a time
    (rows are independent: a cast is elementwise and quantization groups run along the last axis)."""
    import mlx.core as mx
    import numpy as np

    if unit.kind == "copy":
        out = unit.outs[0]
        shards.fd(out.shard)
        dst_off = shards.starts[out.shard] + out.offset
        copy_range(src_fd, shards.fds[out.shard], out.nbytes, unit.offset, dst_off, buf)
        return
    src_dtype = _mx_dtype(unit.code)
    rows, cols = _rows_cols(unit.shape)
    row_bytes = cols * src_dtype.size
    step = max(1, len(buf) // row_bytes) if row_bytes else rows
    row_out = [o.nbytes // rows if rows else 0 for o in unit.outs]
    for r0 in range(0, rows, step):
        r = min(step, rows - r0)
        n = r * row_bytes
        chunk = buf if n <= len(buf) else bytearray(n)  # a single row larger than the buffer
        read_exact(src_fd, memoryview(chunk)[:n], unit.offset + r0 * row_bytes)
        x = mx.array(np.frombuffer(chunk, dtype=np.uint8, count=n)).view(src_dtype).reshape(r, cols)
        if x.dtype != unit.target:
            x = x.astype(unit.target)
        if unit.kind == "quantize":
            s = unit.setting
            results = [a for a in mx.quantize(x, s["group_size"], s["bits"], mode=s["mode"]) if a is not None]
        else:
            results = [x]
        mx.eval(results)
        for out, a, per_row in zip(unit.outs, results, row_out):
            shards.write(out, a, r0 * per_row)
        del x, results
    mx.clear_cache()


class _Plan:
    """What the conversion writes, planned from the source headers and the model tree before any data is read:
    every output tensor's dtype, shape and place in the output shards is known up front, so the shards are
    written in place a bounded chunk at a time (memory stays flat whatever the tensor or shard size), and
    tensors whose bytes do not change are copied file to file."""

    def __init__(self, args, target, quantize: bool, q_recipe: str, requested: dict):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from ..model import Model

        model = Model(args)  # lazy parameters: nothing is materialised
        self.expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        self.quantizable = {name for name, m in model.named_modules() if hasattr(m, "to_quantized")}
        self.mx, self.target, self.quantize, self.recipe, self.requested = mx, target, quantize, q_recipe, requested
        self.sanitize = Model.sanitize
        self.units: list[_Unit] = []
        self.settings: dict[str, dict] = {}
        self._seen: set[str] = set()
        self._quant_shapes: dict = {}

    def add_file(self, file: Path, header: dict) -> None:
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        names = self.sanitize({k: k for k in header if k != "__metadata__"})
        for key in sorted(names):
            self._add(key, file, names[key], header[names[key]], data_start)

    def _add(self, key: str, file: Path, name: str, info: dict, data_start: int) -> None:
        mx = self.mx
        if key not in self.expected:
            raise CheckpointError(f"unexpected tensor {key} in {file}: not a DiffusionGemma text weight")
        if key in self._seen:
            raise CheckpointError(f"tensor {key} appears twice in the checkpoint (again in {file})")
        try:
            code, shape, (begin, stop) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            src_dtype = _mx_dtype(code)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{file} has an unreadable entry for {name}; re-download it") from None
        if shape != self.expected[key]:
            raise CheckpointError(
                f"tensor {key} in {file} has shape {shape} but config.json implies "
                f"{self.expected[key]}; the config and weights do not match"
            )
        rows, cols = _rows_cols(shape)
        if stop - begin != rows * cols * src_dtype.size or begin < 0:
            raise CheckpointError(f"tensor {name} in {file} has the wrong byte count; re-download it")
        self._seen.add(key)
        out_dtype = self.target if mx.issubdtype(src_dtype, mx.floating) else src_dtype
        kind, setting = ("copy" if out_dtype == src_dtype else "cast"), None
        outs = [Out(key, _st_code(out_dtype), shape, rows * cols * out_dtype.size)]
        quantized = self._quantized(key, shape, out_dtype)
        if quantized is not None:
            (kind, setting), outs = ("quantize", quantized[0]), quantized[1]
        self.units.append(_Unit(key, file, data_start + begin, code, shape, kind, setting, out_dtype, outs))

    def _quantized(self, key: str, shape: tuple, out_dtype) -> tuple[dict, list[Out]] | None:
        """(setting, output tensors) when the tensor is a quantizable module's weight that quantizes."""
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if not self.quantize or module not in self.quantizable:
            return None
        rows, cols = _rows_cols(shape)
        setting = recipe_setting(module, self.recipe, self.requested)
        if len(shape) < 2 or cols % setting["group_size"]:
            return None
        self.settings[module] = setting
        spec = (cols, out_dtype, setting["group_size"], setting["bits"], setting["mode"])
        if spec not in self._quant_shapes:  # shapes of mx.quantize's outputs for one row (lazy: no work)
            q = self.mx.quantize(self.mx.zeros((1, cols), dtype=out_dtype), *spec[2:4], mode=spec[4])
            self._quant_shapes[spec] = [(a.shape[-1], a.dtype) for a in q if a is not None]
        return setting, [
            Out(f"{module}.{suffix}", _st_code(dt), shape[:-1] + (n,), rows * n * dt.size)
            for suffix, (n, dt) in zip(("weight", "scales", "biases"), self._quant_shapes[spec])
        ]

    def check_complete(self, src: Path) -> None:
        missing = [k for k in self.expected if k not in self._seen]
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]} is missing from the checkpoint in {src}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def qconfig(self) -> dict | None:
        """The global setting, then every quantized module with its exact setting (bits, group size and mode
        always stated). Modules left unquantized (indivisible input dim) are not listed."""
        if not self.quantize:
            return None
        return {**self.requested, **{m: self.settings[m] for m in sorted(self.settings)}}


def _open_source(unit: _Unit, sources: dict[Path, int]) -> int:
    """The file descriptor of `unit`'s source file, closing the previous file's (units go file by file)."""
    if unit.file not in sources:
        for fd in sources.values():
            os.close(fd)
        sources.clear()
        try:
            sources[unit.file] = os.open(unit.file, os.O_RDONLY)
        except OSError as e:
            raise ReadError(e.strerror or str(e)) from None
    return sources[unit.file]


def _write_all(units: list[_Unit], tmp: Path, shard_cap: int, progress) -> None:
    shards = ShardFiles(tmp, plan_shards(units, shard_cap))
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    buf = bytearray(shard_files.CHUNK_BYTES)  # read at call time: the tests shrink it
    sources: dict[Path, int] = {}
    try:
        for done, unit in enumerate(units, 1):
            try:
                _write_unit(unit, _open_source(unit, sources), shards, buf)
            except ReadError as e:
                raise CheckpointError(f"cannot read {unit.file} ({e}); re-download it") from None
            shards.close_before(max((o.shard for o in unit.outs), default=0))
            if progress is not None:
                progress(done, len(units))
            if delay:
                time.sleep(delay)
    finally:
        for fd in sources.values():
            os.close(fd)
        shards.close()
    shards.finish()


def _convert_into(
    src: Path, tmp: Path, *, dtype, quantize, q_bits, q_group_size, q_mode, q_recipe, progress, shard_cap
) -> None:
    from ..loader import DTYPES, load_config
    from ..tensors import check_layer_count, stored_shapes

    src_config, args = load_config(src)
    if src_config.get("quantization") or src_config.get("quantization_config"):
        raise CheckpointError(f"{src} is already quantized; convert from the original bf16/fp32 checkpoint")
    files = weight_files(src)
    headers = {f: check_safetensors(f) for f in files}
    check_layer_count(args, stored_shapes(headers)[0], src)  # before the model tree is built
    dtype = dtype or _source_dtype(headers)
    requested = {"group_size": q_group_size, "bits": q_bits, "mode": q_mode}
    plan = _Plan(args, DTYPES[dtype], quantize, q_recipe, requested)
    for file in files:
        plan.add_file(file, headers[file])
    plan.check_complete(src)
    _write_all(plan.units, tmp, shard_cap, progress)
    _write_config(src_config, tmp, dtype, plan.qconfig())
    copy_side_files(src, tmp)


def _paths(hf_path: str | Path, mlx_path: str | Path, force: bool) -> tuple[Path, Path]:
    """The source folder and the absolute output folder, refused in one line if the output exists (without
    `force`) or would replace the source."""
    dst = Path(mlx_path).expanduser().absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} already exists; pass --force to replace it, or choose another --mlx-path")
    src = resolve_path(hf_path)
    if dst.exists() and (dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents):
        raise CheckpointError(f"{dst} holds the source checkpoint; choose another output folder")
    return src, dst


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    q_recipe: str = "mixed",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a DiffusionGemma checkpoint into a text-only MLX folder.

    Args:
        hf_path: A Hugging Face checkpoint folder or Hub repo id (safetensors only; the vision tower is
            dropped).
        mlx_path: The output folder. It must not exist unless `force` is set.
        dtype: "bfloat16", "float16" or "float32" for the float tensors; default: the checkpoint's.
        quantize: Quantize the linear layers and the embedding.
        q_bits: Bits of the quantized weights (affine: 4, 6 or 8; mxfp4: 4).
        q_group_size: Quantization group size (affine: 32, 64 or 128; mxfp4: 32).
        q_mode: "affine" or "mxfp4".
        q_recipe: "mixed" keeps the embedding (= LM head), attention, dense MLP and router at 8 bits
            (group 64, affine) and applies the requested setting to the experts and the self-conditioning
            MLP; "uniform" applies the requested setting everywhere.
        force: Replace an existing `mlx_path`.
        progress: Called as `progress(tensors_done, tensors_total)`; default: a progress line on stderr when
            it is a terminal, nothing otherwise.

    Returns:
        The output folder.

    Raises:
        CheckpointError: one line; the input is unusable, the output exists, or writing failed. Nothing is
            left behind on failure or interruption.
    """
    _check_options(dtype, quantize, q_bits, q_group_size, q_mode, q_recipe)
    src, dst = _paths(hf_path, mlx_path, force)
    progress = progress or _progress_bar()
    shard_cap = int(os.environ.get(_SHARD_ENV) or MAX_SHARD_BYTES)
    try:  # a concurrent run to `dst` makes this refuse, or with `force` wait for it and then replace its output
        with build_folder(dst, replace=force, wait=force, hint="pass --force to replace it") as tmp:
            _convert_into(
                src, tmp, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
                q_mode=q_mode, q_recipe=q_recipe, progress=progress, shard_cap=shard_cap,
            )
    except (DiffusionGemmaError, KeyboardInterrupt, SystemExit):
        raise
    except OSError as e:
        raise CheckpointError(f"writing {dst} failed ({e.strerror or e}); nothing was written") from None
    except Exception as e:
        raise CheckpointError(
            f"converting {src} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "nothing was written"
        ) from None
    return dst
