"""What a checkpoint folder is, below both `loader` and `convert`: where a name leads (a folder, `toy`, a Hub
repo), which safetensors files it holds and whether their headers keep their promises, and the side files
(tokenizer, chat template, generation settings) that travel with the weights. No MLX and no model here.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

from .errors import CheckpointError

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the float dtypes a checkpoint is loaded or written in
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap on a header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a text-only runner needs from a Hub repo: never code, never pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


TOY_NAME = "toy"  # the short name of the bundled toy model
TOY_PATH = Path(__file__).resolve().parent / "toy_model"


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local folder as-is, `toy` for the bundled toy model, or a Hub repo id fetched through the HF cache."""
    path = Path(path_or_repo).expanduser()
    if str(path_or_repo) == TOY_NAME and not path.exists():
        if not (TOY_PATH / "config.json").exists():
            raise CheckpointError(f"the toy model is missing from {TOY_PATH}; reinstall, or run scripts/train_toy.py")
        return TOY_PATH
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"no such folder: {name} (pass a checkpoint folder or a Hub repo id like org/name)")
    from .hub import download

    return download(name, ALLOW_PATTERNS)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which must hold an object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(value).__name__}; re-download or fix it")
    return value


def _shard_names(index: Path) -> list[str]:
    """The shard files an index names: plain file names in its folder, never a path that leads elsewhere."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map object of tensor -> shard file names; re-download it")
    names = sorted(set(weight_map.values()))
    for name in names:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).name != name:
            raise CheckpointError(
                f"{index} names the shard {name!r}, which is not a file name in {index.parent}; refusing to read "
                "outside the checkpoint folder"
            )
    return names


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, every shard named by the index checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = _shard_names(index)
        for name in names:
            if not (path / name).is_file():
                raise CheckpointError(
                    f"shard {name} listed in {index.name} is missing from {path}; re-download the checkpoint"
                )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise CheckpointError(
            f"{path} holds only pickle weights (*.bin/*.pt), which are never loaded because they can run "
            "code; convert them to safetensors first"
        )
    raise CheckpointError(f"no *.safetensors weights in {path}")


def _tensor_end(file: Path, key: str, entry: Any) -> int:
    """Where a header entry's bytes end, after checking they are exactly what its dtype and shape need."""
    begin, stop = entry["data_offsets"]
    shape, size = entry["shape"], _DTYPE_BYTES[entry["dtype"]]
    if not all(isinstance(n, int) and n >= 0 for n in (begin, stop, *shape)):
        raise ValueError("bad shape or offsets")
    if stop - begin != math.prod(shape) * size:
        raise CheckpointError(
            f"tensor {key} in {file} holds {stop - begin} bytes but its shape {tuple(shape)} needs "
            f"{math.prod(shape) * size}; re-download it"
        )
    return stop


def check_safetensors(file: Path) -> dict[str, Any]:
    """Parse a safetensors header (at most the format's 100 MB, checked before it is read) and check the file
    holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{file} claims a {n:,}-byte header, more than the {MAX_HEADER_BYTES:,} bytes safetensors "
                    "allows; it is not a valid safetensors file, re-download it"
                )
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = max((_tensor_end(file, k, t) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} is not a valid safetensors file; re-download it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file} ({e.strerror}); check its permissions") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file} is truncated ({size} bytes, header needs {8 + n + end}); re-download it"
        )
    return header


# Files copied next to the weights: tokenizer, chat template, generation settings. Never code or pickles.
_COPY_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "*.jinja", "generation_config.json",
)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, chat template and generation files of `src` into `dst`."""
    for pattern in _COPY_PATTERNS:
        for file in sorted(src.glob(pattern)):
            if file.is_file():
                shutil.copy2(file, dst / file.name)
