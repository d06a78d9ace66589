"""Load a DiffusionGemma checkpoint (HF release, transformers save, our conversions, mlx-vlm conversions)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import (  # noqa: F401  (resolve_path, weight_files, TOY_NAME: re-exported for callers)
    DTYPE_NAMES, TOY_NAME, check_safetensors, copy_side_files, read_json, resolve_path, weight_files,
)
from .backend import prepare_model
from .errors import ChatTemplateError, CheckpointError
from .model import Model, ModelArgs
from .tensors import check_shapes, quant_setting

DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}


def load_config(path: Path) -> tuple[dict, ModelArgs]:
    config = read_json(path / "config.json")
    try:
        return config, ModelArgs.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a DiffusionGemma config: {e}") from None


def load_generation_config(path: Path, config: dict) -> dict:
    """`generation_config.json`, or the copy mlx-vlm embeds in `config.json`, or nothing."""
    file = path / "generation_config.json"
    if file.exists():
        return read_json(file)
    return dict(config.get("generation_config") or {})


def quantize_like(model: Model, qcfg: dict, weights: dict[str, mx.array]) -> None:
    """Quantize (in place) the modules that `weights` stores quantized, with `qcfg`'s setting for each."""
    def predicate(name: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or f"{name}.scales" not in weights:
            return False
        return quant_setting(qcfg, name)

    nn.quantize(model, class_predicate=predicate)


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
    files = weight_files(path)
    qcfg = config.get("quantization") or config.get("quantization_config")
    # Shapes from the headers alone first: a config that implies more than the files hold is refused unbuilt.
    check_shapes(args, qcfg, {file: check_safetensors(file) for file in files}, path)
    weights = {}
    for file in files:
        try:
            tensors = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file} ({e}); re-download it") from None
        weights.update(Model.sanitize(tensors))
    target = _target_dtype(weights, dtype)
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = Model(args)
    if qcfg:
        quantize_like(model, qcfg, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.generation_config = load_generation_config(path, config)
    prepare_model(model)
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


def apply_chat_template(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """The token ids of `messages` rendered by the checkpoint's chat template (jinja, sandboxed by transformers).

    Raises:
        ChatTemplateError: one line, when there is no template or it fails, raises or hits the sandbox.
    """
    where = getattr(tokenizer, "name_or_path", None) or "the checkpoint"
    if getattr(tokenizer, "has_chat_template", True) is False:
        raise ChatTemplateError(
            f"the tokenizer in {where} has no chat template (tokenizer_config.json or chat_template.jinja is "
            "missing); restore it, or pass --ignore-chat-template (Python: chat_template=False)"
        )
    # Thinking is asked for, never assumed: Gemma 4's template thinks only given `enable_thinking`, while
    # mlx-lm's wrapper would switch it on for any vocabulary with the channel markers.
    kwargs.setdefault("enable_thinking", False)
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    except Exception as e:  # a template error, `raise_exception`, a sandbox violation or a Python error inside
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ChatTemplateError(
            f"the chat template in {where} failed ({reason}); fix the template or pass --ignore-chat-template"
        ) from None
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # a BatchEncoding is a Mapping


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
    config = read_json(path / "config.json")
    tokenizer = load_tokenizer(path, config, model.generation_config)
    return model, tokenizer

