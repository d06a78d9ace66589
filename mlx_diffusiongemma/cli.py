"""Command line: `mlx-diffusiongemma COMMAND --help`. Heavy imports stay inside the commands."""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

from ._version import __version__

app = typer.Typer(
    name="mlx-diffusiongemma",
    help="Run Google's DiffusionGemma block-diffusion language model on Apple silicon with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: paragraphs re-wrapped to the terminal (not the source's line breaks), flags without a
    # type column; 100 columns keeps the long defaults (the repo id) on one line.
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
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
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (default: off)."),
):
    """Run Google's DiffusionGemma block-diffusion language model on Apple silicon with MLX."""


@app.command()
def info(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder or Hugging Face repo id."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)."),
):
    """Load a checkpoint and print its geometry, context, dtype, quantization and size (checks it is complete)."""
    from mlx.utils import tree_flatten

    from .loader import load

    m, tokenizer = load(model, dtype=dtype)
    a = m.args
    params = sum(v.size for _, v in tree_flatten(m.parameters()))
    typer.echo(
        f"layers {a.num_hidden_layers} ({a.layer_types.count('full_attention')} full), hidden {a.hidden_size}, "
        f"experts {a.num_experts} top-{a.top_k_experts}, vocab {a.vocab_size}, canvas {a.canvas_length}, "
        f"context {a.max_position_embeddings}, dtype {str(m.model.decoder.norm.weight.dtype).split('.')[-1]}, "
        f"{_quantization(m)}, stored elements {params:,}, eos {sorted(tokenizer.eos_token_ids)}"
    )


def _quantization(model) -> str:
    """What the loaded modules hold: "not quantized", or each (bits, group size, mode) with its module count."""
    from collections import Counter

    kinds = Counter(
        (m.bits, m.group_size, getattr(m, "mode", "affine"))
        for _, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")
    )
    if not kinds:
        return "not quantized"
    parts = [f"{bits}-bit {mode} group {group} ({n} module{'s' * (n > 1)})"
             for (bits, group, mode), n in sorted(kinds.items())]
    return "quantized " + ", ".join(parts)


DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"


_MODEL_HELP = (
    "Checkpoint: a local folder (Google's, a transformers save or an MLX conversion), a Hugging Face repo id, "
    "or `toy` for the bundled toy model."
)
_ADAPTER_HELP = "LoRA adapters folder written by `finetune` to apply to the model (default: none)."
_LIVE_HELP = "Show the canvas being denoised in place on a terminal (never when output is piped)."
_TEMPLATE_CONFIG_HELP = (
    """Extra chat template variables as a JSON object, e.g. '{"enable_thinking": true}' (default: none)."""
)


def _seed(value: Optional[int]) -> Optional[int]:
    """--seed is checked before the model loads (MLX keys on 0 to 2**64 - 1)."""
    if value is not None:
        from .noise import check_seed

        check_seed(value, "--seed")
    return value


# The options `generate` and `chat` share, declared once.
ModelOption = Annotated[str, typer.Option("--model", "-m", help=_MODEL_HELP)]
SystemPromptOption = Annotated[Optional[str], typer.Option(
    "--system-prompt", help="A system message for the chat template, opening the conversation (default: none).")]
MaxTokensOption = Annotated[Optional[int], typer.Option(
    "--max-tokens", help="Most tokens per reply, canvases staying whole (default: the checkpoint's max_new_tokens, "
    "else 256).")]
SeedOption = Annotated[Optional[int], typer.Option(
    "--seed", callback=_seed, help="Random seed, for the whole session in chat (default: a fresh one per reply, "
    "printed with --verbose).")]
DrafterOption = Annotated[str, typer.Option("--drafter", help="Drafter preset (reference, fast) or a JSON file.")]
TemplateConfigOption = Annotated[Optional[str], typer.Option("--chat-template-config", help=_TEMPLATE_CONFIG_HELP)]
DtypeOption = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's).")]
AdapterOption = Annotated[Optional[str], typer.Option("--adapter-path", help=_ADAPTER_HELP)]
LiveOption = Annotated[bool, typer.Option("--live/--no-live", help=_LIVE_HELP)]


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; '-' reads it from standard input."),
    model: ModelOption = DEFAULT_MODEL,
    system_prompt: SystemPromptOption = None,
    max_tokens: MaxTokensOption = None,
    seed: SeedOption = None,
    drafter: DrafterOption = "reference",
    ignore_chat_template: bool = typer.Option(
        False, "--ignore-chat-template", help="Feed the prompt as raw text, without the chat template (default: off)."
    ),
    chat_template_config: TemplateConfigOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    live: LiveOption = True,
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Print statistics to stderr after the text."),
):
    """Generate text for one prompt, printing it as each canvas commits."""
    from .console import run_generate

    run_generate(
        model, prompt, system_prompt=system_prompt, max_tokens=max_tokens, seed=seed, drafter=drafter,
        ignore_chat_template=ignore_chat_template, chat_template_config=chat_template_config, dtype=dtype,
        adapter_path=adapter_path, live=live, verbose=verbose, debug=_DEBUG,
    )


@app.command()
def chat(
    model: ModelOption = DEFAULT_MODEL,
    system_prompt: SystemPromptOption = None,
    max_tokens: MaxTokensOption = None,
    seed: SeedOption = None,
    drafter: DrafterOption = "reference",
    chat_template_config: TemplateConfigOption = None,
    dtype: DtypeOption = None,
    adapter_path: AdapterOption = None,
    live: LiveOption = True,
    verbose: bool = typer.Option(
        False, "--verbose/--quiet", help="Print statistics to stderr after each reply (cache reuse included)."
    ),
):
    """Chat with the model: a multi-turn conversation that reuses the prompt cache (/help inside lists commands)."""
    from .chat import run_chat

    run_chat(
        model, system_prompt=system_prompt, max_tokens=max_tokens, seed=seed, drafter=drafter,
        chat_template_config=chat_template_config, dtype=dtype, adapter_path=adapter_path, live=live,
        verbose=verbose,
    )


@app.command()
def demo(
    task: Optional[str] = typer.Option(None, "--task", help="sort, add or sudoku (default: a few of each)."),
    count: int = typer.Option(3, "--count", "-n", help="Held-out prompts per task."),
    drafter: str = typer.Option("reference", "--drafter", help="Drafter preset (reference, fast) or a JSON file."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Picks the prompts and seeds the noise (default: fresh)."),
    live: bool = typer.Option(True, "--live/--no-live", help=_LIVE_HELP),
    pace: float = typer.Option(
        0.05, "--pace", help="Seconds to pause after each denoising step in the live view, so it can be watched."
    ),
    think: bool = typer.Option(False, "--think/--no-think", help="Switch the chat template's thinking on."),
    tools: bool = typer.Option(False, "--tools", help="Declare a calculator tool; the demo answers its calls."),
):
    """Watch the bundled toy model (trained with `finetune`'s objective) solve held-out puzzles, offline,
    as the turns of one conversation.

    The toy model is a 1.3M-parameter DiffusionGemma (same architecture, tiny geometry) that ships in the
    package; `--model toy` selects it in every other command too.
    """
    from .demo import run_demo

    run_demo(task=task, count=count, drafter=drafter, seed=seed, live=live, pace=pace, think=think, tools=tools)


@app.command()
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Source checkpoint: a Hugging Face folder or Hub repo id."),
    mlx_path: str = typer.Option(..., "--mlx-path", help="Output folder, written only once complete (must not exist unless --force)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16 for the float tensors (default: the checkpoint's)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights (see --q-recipe; default: off)."),
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
    force: bool = typer.Option(False, "--force", help="Replace --mlx-path if it already exists (default: off)."),
):
    """Convert a checkpoint to a text-only MLX folder (sharded safetensors, optionally quantized)."""
    from mlx_diffusiongemma.convert import convert as run_convert

    group = q_group_size or (32 if q_mode == "mxfp4" else 64)
    out = run_convert(
        hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=group,
        q_mode=q_mode, q_recipe=q_recipe, force=force,
    )
    typer.echo(f"wrote {out}")


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint folder or repo id to time."),
    random: Optional[str] = typer.Option(
        None, "--random", help="Random weights with real shapes instead: tiny, small, medium or full (26B)."
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 (random default) or float16."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Quantize --random weights (4, 6 or 8 bits)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Random prompt length to prefill."),
    canvases: int = typer.Option(2, "--canvases", help="Canvases per run."),
    steps: Optional[int] = typer.Option(
        16, "--steps", help="Fixed denoising steps per canvas, adaptive stop off (0: the drafter's own rules)."
    ),
    drafter: str = typer.Option("reference", "--drafter", help="Drafter preset or JSON file."),
    repeat: int = typer.Option(3, "--repeat", help="Timed runs after one warm-up; medians are reported."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    adapter_path: Optional[str] = typer.Option(
        None, "--adapter-path", help="LoRA adapters folder written by `finetune` to time with --model (default: none)."
    ),
    batch: int = typer.Option(
        1, "--batch", min=1, help="Denoise this many prompts together: aggregate tokens/s and per-request latency."
    ),
):
    """Time prefill, decoder steps, commit passes and whole canvases (median, min, max over repeats).

    `--random full --q-bits 4` is the released 26B geometry at the community 4-bit mix: about 15 GB of
    weights and 17 GiB at its peak, so a Mac with 32 GB or more. A run whose estimated memory (weights, KV
    cache, logits, activations) does not fit, or whose prompt and canvases exceed the model's context, is
    refused before anything is built. Under `mlx.launch` the model is split across the processes (README:
    Several Macs) and rank 0 reports its figures.
    """
    from .bench import bench as run_bench

    report = run_bench(model, random, dtype, q_bits, prompt_tokens, canvases, steps or None, drafter, repeat,
                       as_json, adapter_path=adapter_path, batch=batch)
    if report:  # under mlx.launch only rank 0 reports
        typer.echo(report)


# The LoRA options, listed under their own heading by `finetune --help` when rich is installed.
_lora = functools.partial(typer.Option, rich_help_panel="LoRA")


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    data: str = typer.Option(
        ..., "--data", help='JSONL file: one {"messages": [...]} or {"prompt": ..., "completion": ...} per line.'
    ),
    lora_rank: Optional[int] = _lora(None, "--lora-rank", help="LoRA rank (default: 8; --resume: the saved one)."),
    lora_scale: Optional[float] = _lora(
        None, "--lora-scale", help="LoRA scale (default: 20, mlx-lm's; --resume: the saved one)."),
    lora_experts: bool = _lora(
        False, "--lora-experts", help="Also put LoRA on the MoE experts (one pair per expert; default: off)."),
    full: bool = typer.Option(
        False, "--full", help="Train every weight instead of LoRA (small, unquantized models; needs --save-path)."
    ),
    iters: int = typer.Option(100, "--iters", help="Training iterations."),
    batch_size: int = typer.Option(1, "--batch-size", help="Examples per iteration."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", help="Adam learning rate."),
    save_every: int = typer.Option(
        100, "--save-every", help="Save every this many iterations (LoRA: also as NNNNNNN_adapters.safetensors)."
    ),
    adapter_path: Optional[str] = typer.Option(
        None, "--adapter-path", help="Folder for the adapters (default: adapters); --resume reads them from it."
    ),
    save_path: Optional[str] = typer.Option(
        None, "--save-path", help="With --full: the new checkpoint folder to write (must not exist)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue training the adapters in --adapter-path (the optimizer restarts)."
    ),
    val_data: Optional[str] = typer.Option(
        None, "--val-data", help="JSONL validation file, same format as --data (default: none)."
    ),
    val_every: int = typer.Option(
        50, "--val-every", help="Print the validation loss this often (also before training and at the end)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (noise, order, LoRA initialisation)."),
    report_every: int = typer.Option(10, "--steps-per-report", help="Print loss and tokens/s this often."),
):
    """Fine-tune with the block-diffusion objective: LoRA adapters (also on quantized bases) or, with --full,
    every weight."""
    from .train import run_finetune

    run_finetune(
        model, data, lora_rank=lora_rank, lora_scale=lora_scale, lora_experts=lora_experts, full=full,
        iters=iters, batch_size=batch_size, learning_rate=learning_rate, save_every=save_every,
        adapter_path=adapter_path, save_path=save_path, resume=resume, val_data=val_data, val_every=val_every,
        seed=seed, report_every=report_every,
    )


@app.command()
def fuse(
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint the adapters were trained on."),
    adapter_path: str = typer.Option(..., "--adapter-path", help="LoRA adapters folder written by `finetune`."),
    save_path: str = typer.Option(..., "--save-path", help="Output checkpoint folder (must not exist)."),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Write unquantized weights (default: a quantized base stays quantized alike)."
    ),
):
    """Merge LoRA adapters into the base weights and write a normal checkpoint folder."""
    from .fuse import fuse as run_fuse

    typer.echo(f"wrote {run_fuse(model, adapter_path, save_path, dequantize=dequantize)}")


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (beyond loopback, set --api-key)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MLX_DIFFUSIONGEMMA_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1 (default: none; also read from MLX_DIFFUSIONGEMMA_API_KEY).",
    ),
    drafter: str = typer.Option(
        "reference", "--drafter", help="Default drafter preset or JSON file; requests may name a preset only."
    ),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", help="Reply length when a request does not set one (default: the checkpoint's "
        "max_new_tokens, else 256)."
    ),
    max_tokens_limit: int = typer.Option(8192, "--max-tokens-limit", help="The most max_tokens a request may ask."),
    decode_concurrency: int = typer.Option(
        4, "--decode-concurrency", help="Requests denoised together in one batch (per drafter)."
    ),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting beyond those; more are answered 429."),
    prompt_cache_bytes: int = typer.Option(
        1 << 30, "--prompt-cache-bytes", help="Memory for encoded prompt prefixes reused across requests (0: off)."
    ),
    chat_template_args: Optional[str] = typer.Option(
        None, "--chat-template-args", help="Default chat template variables as a JSON object (requests' "
        "chat_template_kwargs win)."
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path", help=_ADAPTER_HELP),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="On SIGTERM, seconds requests in flight may take to finish before they are "
        "cancelled."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat and completions, streaming, tool calls)."""
    from .serve import run_serve

    run_serve(model, host=host, port=port, api_key=api_key, drafter=drafter, max_tokens=max_tokens,
              max_tokens_limit=max_tokens_limit, decode_concurrency=decode_concurrency, max_queue=max_queue,
              prompt_cache_bytes=prompt_cache_bytes, chat_template_args=chat_template_args, dtype=dtype,
              adapter_path=adapter_path, drain_timeout=drain_timeout, log_level=log_level)


def _null_for_closed_streams() -> None:
    """A closed standard stream (`>&-`) becomes /dev/null: writes go nowhere instead of failing, and its file
    descriptor is not handed to the next file this process opens (where stray writes would corrupt it)."""
    import os

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is None:
            null = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))


def main() -> None:
    from .errors import DiffusionGemmaError

    _null_for_closed_streams()
    try:
        app()
    except DiffusionGemmaError as e:
        if _DEBUG:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except OSError as e:  # unreadable files and folders (permissions, I/O errors): one line, not a traceback
        if _DEBUG:
            raise
        typer.echo(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)
