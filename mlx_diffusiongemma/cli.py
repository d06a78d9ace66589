"""Command line: `mlx-diffusiongemma COMMAND --help`. Heavy imports stay inside the commands."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ._version import __version__

app = typer.Typer(
    name="mlx-diffusiongemma",
    help="Run Google's DiffusionGemma block-diffusion language model on Apple silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_DEBUG = "--debug" in sys.argv


def _version(value: bool):
    if value:
        typer.echo(f"mlx-diffusiongemma {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    """Run Google's DiffusionGemma block-diffusion language model on Apple silicon with MLX."""


@app.command()
def info(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder or Hugging Face repo id."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)."),
):
    """Load a checkpoint and print its geometry, dtype and size (checks that it is complete)."""
    from .loader import load

    m, tokenizer = load(model, dtype=dtype)
    a = m.args
    params = sum(v.size for _, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(m.parameters()))
    typer.echo(
        f"layers {a.num_hidden_layers} ({a.layer_types.count('full_attention')} full), hidden {a.hidden_size}, "
        f"experts {a.num_experts} top-{a.top_k_experts}, vocab {a.vocab_size}, canvas {a.canvas_length}, "
        f"dtype {m.model.decoder.norm.weight.dtype}, stored elements {params:,}, eos {tokenizer.eos_token_ids}"
    )


def main() -> None:
    from .errors import DiffusionGemmaError

    try:
        app()
    except DiffusionGemmaError as e:
        if _DEBUG:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)
