"""`fuse`: merge LoRA adapters into their base checkpoint and write a folder `load` reads. A command: it sits
above both `loader` (reading the base, writing the folder) and `lora` (the adapters)."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .loader import load_config, load_model, resolve_path, save_checkpoint
from .lora import fuse_lora, load_adapters


def fuse(model_path: str | Path, adapter_path: str | Path, save_path: str | Path, *, dequantize: bool = False) -> Path:
    """Merge LoRA adapters into their base checkpoint and write a checkpoint folder that `load` reads.

    Args:
        model_path: The base checkpoint (folder or Hub repo id) the adapters were trained on.
        adapter_path: The folder written by `finetune`.
        save_path: The output folder; it must not exist. Built under a temporary name and renamed into place.
        dequantize: Write every weight unquantized; by default a quantized base stays quantized as it was
            (the fused linears are re-quantized with the base's settings; config.json keeps its block).

    Returns:
        The output folder.
    """
    from mlx_lm.utils import dequantize_model


    dest = Path(save_path).expanduser()
    if dest.exists():
        raise CheckpointError(f"{dest} already exists; choose a new --save-path")
    source = resolve_path(model_path)
    config, _ = load_config(source)
    model = load_model(source)
    load_adapters(model, adapter_path)
    fuse_lora(model, dequantize=dequantize)
    if dequantize:
        dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return save_checkpoint(model, source, dest, config)
