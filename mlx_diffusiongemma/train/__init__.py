"""Fine-tuning DiffusionGemma in MLX (LoRA, QLoRA or every weight): `loss` (the block-diffusion SFT objective),
`data` (JSONL records and their tokenization), `loop` (the training loop) and `command` (`finetune`)."""

from .command import run_finetune
from .data import read_jsonl, tokenize
from .loop import train, validation_loss
from .loss import EPS, diffusion_loss, encoder_forward, prefix_cache

__all__ = ["EPS", "diffusion_loss", "encoder_forward", "prefix_cache", "read_jsonl", "run_finetune", "tokenize",
           "train", "validation_loss"]
