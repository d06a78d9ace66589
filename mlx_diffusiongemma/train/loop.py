"""The training loop: Adam on the trainable parameters over the examples, with periodic reports, validation
under fixed noise and saves."""

from __future__ import annotations

import math
import random
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import UsageError
from ..model import Model
from .loss import diffusion_loss


VAL_SEED = 1_000_003  # validation noise: the i-th validation example always draws key VAL_SEED + i


def validation_loss(model: Model, examples: list[tuple[list[int], int]], **loss_kwargs) -> float:
    """Mean loss over `examples`, each under a fixed noise key, so values compare across reports and runs."""
    total = 0.0
    for i, (ids, prompt_len) in enumerate(examples):
        total += diffusion_loss(model, ids, prompt_len, mx.random.key(VAL_SEED + i), **loss_kwargs)[0].item()
    return total / len(examples)


def _draw(examples, order: list[int], rng: random.Random, n: int):
    """`n` examples, reshuffling each time every example has been used once."""
    batch = []
    for _ in range(n):
        if not order:
            order.extend(range(len(examples)))
            rng.shuffle(order)
        batch.append(examples[order.pop()])
    return batch


def _update(model: Model, optimizer, loss_and_grad, batch, keys: mx.array, it: int) -> float:
    """One optimizer step; its loss, or a `UsageError` once it is not finite (the weights are already ruined:
    stop before any save)."""
    loss, grads = loss_and_grad(batch, keys)
    optimizer.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), optimizer.state)
    if not math.isfinite(value := loss.item()):
        raise UsageError(f"training stopped at iteration {it}: the loss is {value} (lower --learning-rate); these "
                         "weights were not saved")
    return value


def train(
    model: Model,
    examples: list[tuple[list[int], int]],
    *,
    iters: int,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    seed: int = 0,
    report_every: int = 10,
    save_every: int = 0,
    save=None,
    val_examples: list[tuple[list[int], int]] | None = None,
    val_every: int = 50,
    log=print,
    **loss_kwargs,
) -> list[float]:
    """Adam on the model's trainable parameters; returns the loss of every iteration.

    Logs `iter N: loss L, T tokens/s` every `report_every` iterations and, given `val_examples`,
    `iter N: val loss L` before training, every `val_every` iterations and at the end. Calls `save(N)` every
    `save_every` iterations before the last (the caller saves the final state).
    """
    optimizer = optim.Adam(learning_rate=learning_rate)
    rng = random.Random(seed)
    key = mx.random.key(seed)

    def batch_loss(batch, keys):
        losses = [diffusion_loss(model, ids, p, k, **loss_kwargs)[0] for (ids, p), k in zip(batch, keys)]
        return sum(losses) / len(losses)

    def validate(it):
        if val_examples:
            log(f"iter {it}: val loss {validation_loss(model, val_examples, **loss_kwargs):.4f}")

    loss_and_grad = nn.value_and_grad(model, batch_loss)
    order: list[int] = []
    history, tokens, elapsed = [], 0, 0.0  # elapsed: training steps only, not validation or saving
    validate(0)
    for it in range(1, iters + 1):
        tic = time.perf_counter()
        batch = _draw(examples, order, rng, batch_size)
        key, sub = mx.random.split(key)
        history.append(_update(model, optimizer, loss_and_grad, batch, mx.random.split(sub, batch_size), it))
        elapsed += time.perf_counter() - tic
        tokens += sum(len(ids) for ids, _ in batch)
        if it % report_every == 0 or it == iters:
            log(f"iter {it}: loss {history[-1]:.4f}, {tokens / max(elapsed, 1e-9):.1f} tokens/s")
            tokens, elapsed = 0, 0.0
        if (val_every and it % val_every == 0) or it == iters:
            validate(it)
        if save is not None and save_every and it % save_every == 0 and it < iters:
            _check_finite(model, it)
            save(it)
    _check_finite(model, iters)
    return history


def _check_finite(model: Model, it: int) -> None:
    """A finite loss can still come with an update that made weights NaN or infinite: never save those."""
    if not all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.trainable_parameters())):
        raise UsageError(f"training stopped at iteration {it}: the weights became NaN or infinite (lower "
                         "--learning-rate); they were not saved")
