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


DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"


@app.command()
def generate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint folder or Hugging Face repo id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; '-' reads it from standard input."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message (chat template)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate (canvases stay whole)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; default: a fresh one, printed with --verbose."),
    drafter: str = typer.Option("reference", "--drafter", help="Drafter preset (reference, fast) or a JSON file."),
    ignore_chat_template: bool = typer.Option(False, "--ignore-chat-template", help="Feed the prompt as raw text."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print statistics after the text."),
):
    """Generate text for one prompt, printing it as each canvas commits."""
    from .generate import stream_generate
    from .loader import load

    text = sys.stdin.read() if prompt == "-" else prompt
    if ignore_chat_template:
        if system_prompt:
            raise typer.BadParameter("--system-prompt needs the chat template", param_hint="--system-prompt")
        request = text
    else:
        request = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
    m, tokenizer = load(model, dtype=dtype)
    last = None
    for last in stream_generate(
        m, tokenizer, request, max_tokens=max_tokens, drafter=drafter, seed=seed,
        chat_template=not ignore_chat_template,
    ):
        typer.echo(last.text, nl=False)
        sys.stdout.flush()
    typer.echo()
    if verbose and last is not None:
        _print_stats(last)


def _print_stats(r) -> None:
    steps = "/".join(str(s) for s in r.steps_per_canvas)
    typer.echo("=" * 10, err=True)
    typer.echo(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", err=True)
    typer.echo(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", err=True)
    typer.echo(f"Peak memory: {r.peak_memory:.3f} GB", err=True)
    typer.echo(
        f"Diffusion: {r.canvases} canvases, steps per canvas {steps} ({r.total_steps} decoder passes), "
        f"{r.tokens_per_forward:.2f} tokens per forward, drafter {r.drafter}, seed {r.seed}, "
        f"finish {r.finish_reason}",
        err=True,
    )


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Source checkpoint: a Hugging Face folder or Hub repo id."),
    mlx_path: str = typer.Option(..., "--mlx-path", help="Output folder (must not exist unless --force)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16 for the float tensors (default: the checkpoint's)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights (see --q-recipe)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per quantized weight: 4, 6 or 8 (mxfp4: 4)."),
    q_group_size: Optional[int] = typer.Option(
        None, "--q-group-size", help="Quantization group size: 32, 64 or 128 (default: 64; mxfp4: 32)."
    ),
    q_mode: str = typer.Option("affine", "--q-mode", help="Quantization mode: affine or mxfp4."),
    q_recipe: str = typer.Option(
        "mixed", "--q-recipe",
        help="mixed: embedding, attention, dense MLP and router at 8 bits, the rest at --q-bits; "
        "uniform: everything at --q-bits.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --mlx-path if it already exists."),
):
    """Convert a checkpoint to a text-only MLX folder (sharded safetensors, optionally quantized)."""
    from mlx_diffusiongemma.convert import ConversionOptionError, convert as run_convert

    if quantize and q_bits not in (4, 6, 8):
        raise ConversionOptionError(f"--q-bits must be 4, 6 or 8 (got {q_bits})")
    if q_mode not in ("affine", "mxfp4"):
        raise ConversionOptionError(f"--q-mode must be affine or mxfp4 (got {q_mode!r})")
    if q_recipe not in ("mixed", "uniform"):
        raise ConversionOptionError(f"--q-recipe must be mixed or uniform (got {q_recipe!r})")
    group = q_group_size or (32 if q_mode == "mxfp4" else 64)
    out = run_convert(
        hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=group,
        q_mode=q_mode, q_recipe=q_recipe, force=force,
    )
    typer.echo(f"wrote {out}")


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
