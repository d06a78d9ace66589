"""One process of a group (`mlx.launch`, several Macs): joining the group, loading only this rank's part of each
tensor, and agreeing on failures, so that an error on any rank ends every rank with one line (from rank 0).

Loading reads each tensor's slice straight from the safetensors file through a read-only memory map: a slice
along the first axis (vocabulary rows, experts, output rows) is one contiguous byte range, so a rank reads
and holds about 1/N of the sharded weights; a slice along the last axis (`o_proj`, `down_proj` columns)
copies only its columns.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlx.core as mx
import numpy as np

from . import distributed
from .backend import prepare_model
from .checkpoint import check_safetensors, read_json, resolve_path, weight_files
from .errors import DiffusionGemmaError, UsageError
from .loader import DTYPES, load_config, load_generation_config, load_tokenizer, quantize_like
from .model import Model
from .tensors import check_shapes, stored_shapes

Group = mx.distributed.Group
T = TypeVar("T")
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "U8": np.uint8,
          "I32": np.int32, "U16": np.uint16, "I8": np.int8, "I64": np.int64}
_MESSAGE_BYTES = 1024  # a failure's line, as each rank shares it


def join() -> Group | None:
    """The group this process belongs to (`mlx.launch` or MLX_HOSTFILE/MLX_RANK), or None when it runs alone."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def refuse_split(command: str) -> None:
    """Under `mlx.launch`, end a command that does not run split across processes: rank 0 says so in one line,
    the other ranks leave quietly (N copies each holding the whole model would not be what was asked for)."""
    group = join()
    if group is None:
        return
    if group.rank():
        raise SystemExit(1)
    raise UsageError(f"{command} does not run split across processes yet; start it without mlx.launch (one "
                     "process, holding the whole model)")


def _target(codes: dict[str, str], dtype: str | None):
    # As `loader._target_dtype`: the embedding's (or its scales') dtype unless one is asked for.
    if dtype is not None:
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    code = codes.get("model.decoder.embed_tokens.scales", codes.get("model.decoder.embed_tokens.weight"))
    return {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16}.get(code, mx.float32)


def _read_part(file_map: np.memmap, data_start: int, entry: dict, cut: distributed.Cut | None) -> mx.array:
    code, shape = entry["dtype"], tuple(entry["shape"])
    whole = np.ndarray(shape, dtype=_NUMPY[code], buffer=file_map, offset=data_start + entry["data_offsets"][0])
    part = mx.array(np.ascontiguousarray(whole if cut is None else distributed.cut(whole, cut)))
    return part.view(mx.bfloat16) if code == "BF16" else part


def load_model_part(path: Path, group: Group, dtype: str | None = None) -> Model:
    """This rank's part of the model in `path`, checked as `loader.load_model` checks a whole one, reading only
    the slices it keeps; the process's vocabulary split is then active (`distributed.activate`)."""
    config, args = load_config(path)
    files = weight_files(path)
    qcfg = config.get("quantization") or config.get("quantization_config")
    headers = {file: check_safetensors(file) for file in files}
    check_shapes(args, qcfg, headers, path)
    stored, origin, codes = stored_shapes(headers)
    target = _target(codes, dtype)
    model = Model(args)  # random weights stay lazy: never evaluated, replaced below
    if qcfg:
        quantize_like(model, qcfg, stored)
    cuts, split = distributed.restructure(model, group)
    distributed.slice_parameters(model, cuts)  # lazy too: only the shapes, for the strict load below
    weights = []
    for file, header in headers.items():
        with open(file, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        file_map = np.memmap(file, dtype=np.uint8, mode="r")
        for key, name in Model.sanitize({k: k for k in header if k != "__metadata__"}).items():
            part = _read_part(file_map, data_start, header[name], cuts.get(key))
            part = part.astype(target) if mx.issubdtype(part.dtype, mx.floating) else part
            mx.eval(part)  # one slice at a time: the peak stays near this rank's share
            weights.append((key, part))
        del file_map
    model.load_weights(weights, strict=True)
    model.generation_config = load_generation_config(path, config)
    prepare_model(model)
    mx.eval(model.parameters())
    distributed.activate(split)
    return model


def load_sharded(path_or_repo: str | Path, group: Group, *, dtype: str | None = None):
    """`loader.load` for one rank of `group`: `(model part, tokenizer)`."""
    path = resolve_path(path_or_repo)
    model = load_model_part(path, group, dtype)
    tokenizer = load_tokenizer(path, read_json(path / "config.json"), model.generation_config)
    return model, tokenizer


def _first_failure(group: Group, failure: str | None) -> tuple[int, str] | None:
    """Every rank's failure line (or none), exchanged; the lowest failing rank and its line, or None."""
    data = (failure or "").encode("utf-8", "replace")[: _MESSAGE_BYTES - 2]
    buf = np.zeros(_MESSAGE_BYTES, dtype=np.uint8)
    buf[:2] = len(data) // 256, len(data) % 256
    buf[2 : 2 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    every = np.array(mx.distributed.all_gather(mx.array(buf)[None], group=group))
    for rank, row in enumerate(every):
        n = int(row[0]) * 256 + int(row[1])
        if n:
            return rank, bytes(row[2 : 2 + n]).decode("utf-8", "replace")
    return None


def _line(e: BaseException) -> str:
    """The one line a failure is reported with (never empty: an empty line would read as no failure)."""
    if isinstance(e, DiffusionGemmaError) and str(e):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def together(group: Group, work: Callable[[], T], debug: bool = False) -> T:
    """`work()` on this rank (checks and loading: no collective inside), then every rank learns whether any
    failed. On a failure rank 0 raises a `DiffusionGemmaError` with the lowest failing rank's line (the CLI
    prints it) and every other rank exits with status 1 quietly; with `debug` the failing rank raises its own
    exception (traceback) instead."""
    error: BaseException | None = None
    try:
        result = work()
    except Exception as e:  # any failure must reach the other ranks, which would otherwise wait forever
        error = e
    first = _first_failure(group, None if error is None else _line(error))
    if first is None:
        return result
    if debug and error is not None:
        raise error
    rank, line = first
    if group.rank() == 0:
        raise DiffusionGemmaError(line if rank == 0 else f"rank {rank}: {line}")
    raise SystemExit(1)


def shared_seed(group: Group, seed: int | None) -> int:
    """`seed` (the same on every rank: the same command line), or one drawn by rank 0 for every rank."""
    if seed is not None:
        return seed
    mine = secrets.randbits(31) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group).item())
