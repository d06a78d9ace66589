"""The `finetune` command: check the options, read and tokenize the data, make the model trainable (LoRA,
QLoRA or every weight), train and save."""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import UsageError
from ..noise import check_seed
from .data import read_jsonl, tokenize
from .loop import train


def _check_options(full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts, counts,
                   learning_rate, seed) -> None:
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 (got {value})")
    check_seed(seed, "--seed")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise UsageError(f"--learning-rate must be a positive number (got {learning_rate})")
    if full:
        given = [("--resume", resume), ("--adapter-path", adapter_path), ("--lora-rank", lora_rank),
                 ("--lora-scale", lora_scale), ("--lora-experts", lora_experts)]
        conflict = next((name for name, value in given if value not in (None, False)), None)
        if conflict:
            raise UsageError(f"--full trains every weight and takes no {conflict} (to continue a full fine-tune, "
                             "pass its folder as --model)")
        if save_path is None:
            raise UsageError("--full needs --save-path DIR, the folder for the fine-tuned checkpoint")
        if Path(save_path).expanduser().exists():
            raise UsageError(f"{save_path} already exists; choose a new --save-path")
    elif save_path is not None:
        raise UsageError("--save-path is for --full; LoRA adapters go to --adapter-path (`fuse` merges them)")
    target, flag = (save_path, "--save-path") if full else (adapter_path or "adapters", "--adapter-path")
    _check_writable(Path(target).expanduser().absolute(), flag)


def _check_writable(path: Path, flag: str) -> None:
    """Refuse before loading and training, not after, an output folder that cannot be made or written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: {probe} is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: {probe} is not writable; choose another folder")


def _resume_config(path: Path, rank: int | None, scale: float | None, experts: bool) -> dict:
    """The saved adapter config, after checking the LoRA flags given agree with it."""
    from ..lora import CONFIG_FILE, EXPERT_TARGETS, read_adapter_config

    if not (path / CONFIG_FILE).exists():
        raise UsageError(f"--resume needs adapters in {path}, which has no {CONFIG_FILE}; train without --resume")
    saved = read_adapter_config(path)
    for flag, value, field in (("--lora-rank", rank, "rank"), ("--lora-scale", scale, "scale")):
        if value is not None and value != saved.get(field):
            raise UsageError(f"{flag} {value} differs from the {field} {saved.get(field)} of the adapters in "
                             f"{path}; drop {flag} to resume")
    if experts and not set(EXPERT_TARGETS) <= set(saved.get("modules", ())):
        raise UsageError(f"the adapters in {path} have no expert LoRA; drop --lora-experts to resume them")
    return saved


def _tokenized(tokenizer, records, path, args) -> list[tuple[list[int], int]]:
    """Tokenize every record, refusing (naming the line) one the template rejects or the context cannot hold."""
    examples, C = [], args.canvas_length
    for lineno, messages in records:
        try:
            ids, prompt_len = tokenize(tokenizer, messages)
        except Exception as e:  # the template rejected the messages, or renders them oddly
            raise UsageError(f"{path}, line {lineno}: cannot tokenize the conversation ({e})") from None
        blocks = math.ceil((len(ids) - prompt_len) / C)  # the response is trained as whole canvases
        if prompt_len + blocks * C > args.max_position_embeddings:
            raise UsageError(
                f"{path}, line {lineno}: the conversation needs {prompt_len + blocks * C} positions (a {prompt_len}"
                f"-token prompt and {blocks} canvases of {C}), more than the model's context of "
                f"{args.max_position_embeddings}; shorten or drop it"
            )
        examples.append((ids, prompt_len))
    return examples


def _trainer(model, source: Path, *, full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts):
    """Make the model trainable (all of it, or LoRA); returns (what is trained, save(name), output folder)."""
    from ..loader import load_config, save_checkpoint
    from ..lora import ADAPTER_FILE, DEFAULT_RANK, DEFAULT_SCALE, EXPERT_TARGETS, TARGETS, apply_lora, \
        load_adapters, save_adapters

    if full:
        if any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
            raise UsageError(f"--full cannot train the quantized weights of {source}; use LoRA (the default) "
                             "or an unquantized checkpoint")
        model.unfreeze()
        config, out = load_config(source)[0], Path(save_path).expanduser()
        saved = []  # the first save makes the folder (refused if it appeared meanwhile), later ones replace it
        return "every weight", lambda it=None: saved.append(save_checkpoint(model, source, out, config,
                                                                            replace=bool(saved))), out
    out = Path(adapter_path or "adapters")
    if resume:
        config = load_adapters(model, out)
        what = f"LoRA rank {config['rank']} resumed from {out}"
    else:
        modules = TARGETS + (EXPERT_TARGETS if lora_experts else ())
        config = apply_lora(model, lora_rank or DEFAULT_RANK, DEFAULT_SCALE if lora_scale is None else lora_scale,
                            modules=modules)
        what = f"LoRA rank {config['rank']}{' with experts' if lora_experts else ''}"

    def save(it=None):
        if it is not None:  # a numbered copy too, so an earlier state can be picked by its validation loss
            save_adapters(model, out, config, name=f"{it:07d}_{ADAPTER_FILE}")
        save_adapters(model, out, config)

    return what, save, out


def _holding_save_path(run):
    """With --full, hold the --save-path lock for the whole run, so a concurrent run to it refuses at once and
    not after training; SIGTERM then ends the run as Ctrl-C does, and nothing of it is left behind."""

    @functools.wraps(run)
    def wrapper(*args, full: bool = False, save_path: str | None = None, **kwargs):
        if not (full and save_path):
            return run(*args, full=full, save_path=save_path, **kwargs)
        from ..folders import target_lock, terminate_as_interrupt

        path = Path(save_path).expanduser().absolute()
        _check_writable(path, "--save-path")  # before the lock makes its parent folders
        with terminate_as_interrupt(), target_lock(path):
            return run(*args, full=full, save_path=save_path, **kwargs)

    return wrapper


@_holding_save_path
def run_finetune(
    model_path: str, data: str, *, lora_rank: int | None = None, lora_scale: float | None = None,
    lora_experts: bool = False, full: bool = False, iters: int = 100, batch_size: int = 1,
    learning_rate: float = 1e-4, save_every: int = 100, adapter_path: str | None = None,
    save_path: str | None = None, resume: bool = False, val_data: str | None = None, val_every: int = 50,
    seed: int = 0, report_every: int = 10,
) -> Path:
    """The `finetune` command: read the data, load the model, train (LoRA or `full`) and save; returns the
    output folder (adapters, or with `full` a checkpoint folder at `save_path`)."""
    from ..loader import load, resolve_path

    counts = {"--iters": iters, "--batch-size": batch_size, "--lora-rank": lora_rank, "--val-every": val_every,
              "--steps-per-report": report_every}
    _check_options(full, resume, adapter_path, save_path, lora_rank, lora_scale, lora_experts, counts,
                   learning_rate, seed)
    if resume:
        _resume_config(Path(adapter_path or "adapters"), lora_rank, lora_scale, lora_experts)
    records = read_jsonl(data)
    val_records = read_jsonl(val_data) if val_data is not None else None
    source = resolve_path(model_path)
    model, tokenizer = load(source)
    examples = _tokenized(tokenizer, records, data, model.args)
    val_examples = _tokenized(tokenizer, val_records, val_data, model.args) if val_records else None
    mx.random.seed(seed)  # the LoRA A matrices' initialisation
    what, save, out = _trainer(model, source, full=full, resume=resume, adapter_path=adapter_path,
                               save_path=save_path, lora_rank=lora_rank, lora_scale=lora_scale,
                               lora_experts=lora_experts)

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    n_tok = sum(len(ids) for ids, _ in examples)
    n_par = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    val = f", {len(val_examples)} validation examples" if val_examples else ""
    log(f"{len(examples)} examples, {n_tok} tokens{val}; training {what}: {n_par:,} parameters")

    def periodic_save(it):
        save(it)
        log(f"iter {it}: saved to {out}")

    train(model, examples, iters=iters, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
          report_every=report_every, save_every=save_every, save=periodic_save, val_examples=val_examples,
          val_every=val_every, log=log)
    save()
    log(f"saved {'the checkpoint' if full else 'adapters'} to {out}")
    return out
