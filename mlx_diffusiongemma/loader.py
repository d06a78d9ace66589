"""Load a DiffusionGemma checkpoint (HF release, transformers save, our conversions, mlx-vlm conversions)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .model import Model, ModelArgs

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a text-only runner needs from a Hub repo: never code, never pickles.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


TOY_NAME = "toy"  # the short name of the bundled toy model


def resolve_path(path_or_repo: str | Path) -> Path:
    """A local folder as-is, `toy` for the bundled toy model, or a Hub repo id fetched through the HF cache."""
    path = Path(path_or_repo).expanduser()
    if str(path_or_repo) == TOY_NAME and not path.exists():
        from .toy import TOY_PATH

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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check its permissions") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, every shard named by the index checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        for name in names:
            if not (path / name).exists():
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


def check_safetensors(file: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} is not a valid safetensors file; re-download it") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file} ({e.strerror}); check its permissions") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file} is truncated ({size} bytes, header needs {8 + n + end}); re-download it"
        )
    return header


def load_config(path: Path) -> tuple[dict, ModelArgs]:
    config = _read_json(path / "config.json")
    try:
        return config, ModelArgs.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a DiffusionGemma config: {e}") from None


def load_generation_config(path: Path, config: dict) -> dict:
    """`generation_config.json`, or the copy mlx-vlm embeds in `config.json`, or nothing."""
    file = path / "generation_config.json"
    if file.exists():
        return _read_json(file)
    return dict(config.get("generation_config") or {})


def _quantize(model: Model, qcfg: dict, weights: dict[str, mx.array]) -> None:
    default = {"group_size": qcfg.get("group_size", 64), "bits": qcfg.get("bits", 4),
               "mode": qcfg.get("mode", "affine")}

    def predicate(name: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{name}.scales" not in weights:
            return False
        entry = qcfg.get(name)
        if isinstance(entry, dict):  # a per-module override; mlx-vlm omits "mode" for affine ones
            return {"group_size": entry.get("group_size", 64), "bits": entry["bits"],
                    "mode": entry.get("mode", "affine")}
        return default

    nn.quantize(model, class_predicate=predicate)


def _check_tensors(model: Model, weights: dict[str, mx.array], origin: dict[str, str], path: Path):
    expected = dict(tree_flatten(model.parameters()))
    for key in weights:
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key} in {origin.get(key, path)}: not a DiffusionGemma text weight")
    for key, param in expected.items():
        if key not in weights:
            raise CheckpointError(f"tensor {key} is missing from the checkpoint in {path}")
        if tuple(weights[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {key} in {origin.get(key, path)} has shape {tuple(weights[key].shape)} but config.json "
                f"implies {tuple(param.shape)}; the config and weights do not match"
            )


def _target_dtype(weights: dict[str, mx.array], dtype: str | None):
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    embed = weights.get("model.decoder.embed_tokens.scales", weights.get("model.decoder.embed_tokens.weight"))
    return embed.dtype if embed is not None and mx.issubdtype(embed.dtype, mx.floating) else mx.float32


def load_model(path: Path, dtype: str | None = None, lazy: bool = False) -> Model:
    """Build the model from `config.json` and load its safetensors strictly (text weights only)."""
    config, args = load_config(path)
    weights, origin = {}, {}
    for file in weight_files(path):
        check_safetensors(file)
        try:
            tensors = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file} ({e}); re-download it") from None
        for key, value in Model.sanitize(tensors).items():
            weights[key] = value
            origin[key] = str(file)
    target = _target_dtype(weights, dtype)
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = Model(args)
    qcfg = config.get("quantization") or config.get("quantization_config")
    if qcfg:
        _quantize(model, qcfg, weights)
    _check_tensors(model, weights, origin, path)
    model.load_weights(list(weights.items()), strict=True)
    model.generation_config = load_generation_config(path, config)
    if not lazy:
        mx.eval(model.parameters())
    return model


def save_checkpoint(model: Model, source: Path, dest: str | Path, config: dict, *, replace: bool = False) -> Path:
    """Write `model` as a checkpoint folder `load` reads: its weights (mlx-lm's `save_model`: model.safetensors),
    `config` as config.json, and the tokenizer and generation files of the `source` folder.

    The folder is built under a temporary name beside `dest` and renamed into place (`folders.build_folder`),
    so a failure or an interruption leaves nothing half-written; an existing `dest` is refused unless `replace`,
    and then replaced only once the new one is complete.
    """
    from mlx_lm.utils import save_model

    from .convert.convert import copy_side_files
    from .folders import build_folder, write_error

    dest = Path(dest).expanduser().absolute()
    try:
        with build_folder(dest, replace=replace, hint="choose a new --save-path") as tmp:
            save_model(tmp, model)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(source, tmp)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write (a full disk) as a RuntimeError
        raise write_error(dest, e) from None
    return dest


def eos_token_ids(config: dict, generation_config: dict) -> list[int]:
    ids: list[int] = []
    for source in (generation_config, config, config.get("text_config", {})):
        value = source.get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def load_tokenizer(path: Path, config: dict, generation_config: dict):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise CheckpointError(f"no tokenizer (tokenizer.json) in {path}; copy the tokenizer files next to the weights")
    try:
        return load_mlx_tokenizer(path, eos_token_ids=eos_token_ids(config, generation_config))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e})") from None


def load(path_or_repo: str | Path, *, dtype: str | None = None, lazy: bool = False,
         adapter_path: str | Path | None = None):
    """Load a DiffusionGemma checkpoint and its tokenizer.

    Args:
        path_or_repo: A local checkpoint folder or a Hugging Face repo id (fetched through the HF cache;
            set `HF_HUB_OFFLINE=1` to use the cache only).
        dtype: "float32", "bfloat16" or "float16"; default: the checkpoint's own.
        lazy: Leave weights unevaluated (loaded on first use).
        adapter_path: A folder written by `mlx-diffusiongemma finetune` (LoRA adapters) to apply.

    Returns:
        `(model, tokenizer)`; `model.generation_config` holds the checkpoint's generation settings.

    Raises:
        CheckpointError: one actionable line naming the file or tensor at fault.
    """
    path = resolve_path(path_or_repo)
    model = load_model(path, dtype=dtype, lazy=lazy)
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    config = _read_json(path / "config.json")
    tokenizer = load_tokenizer(path, config, model.generation_config)
    return model, tokenizer

