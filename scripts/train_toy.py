"""Train the bundled toy DiffusionGemma from scratch, reproducibly, and score it.

    pip install -e '.[test]'      # transformers + torch write the initial HF checkpoint
    python scripts/train_toy.py --out /tmp/toy-stage1 --eval-prompts 0                  # 47 min here
    python scripts/train_toy.py --resume-from /tmp/toy-stage1 --out /tmp/toy \\
        --tasks add,add,add,add,sort,sudoku --iters 3000 --learning-rate 2e-3 --seed 1   # 17-23 min here

are the two stages that made `mlx_diffusiongemma/toy_model/` (its `metrics.json` records both commands).
The first learns sort and sudoku; addition needs the second, weighted to it, to leave its plateau.

The model is the real architecture at a small size: sliding and full attention layers, a dense MLP beside a
top-2-of-8 mixture of experts, the self-conditioning MLP, a character-level tokenizer with the Gemma 4 chat
format, and a 24-token canvas. transformers builds the random initial checkpoint (so the folder is
HF-format by construction); MLX trains it with the block-diffusion SFT loss of `train.diffusion_loss` on
prompts drawn fresh from `tasks.py` (never a held-out one), then the trained tensors are written back under
their HF names. Everything is seeded; `metrics.json` records each stage's command, time and final losses and
the held-out accuracy and mean denoising steps per task for the `reference` and `fast` drafters.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "benchmarks")]

from checkpoints import CHAT_TEMPLATE, RELEASED_GENERATION_CONFIG, build_checkpoint  # noqa: E402

from openblas import reexec_with_openblas  # noqa: E402

from mlx_diffusiongemma.loader import load  # noqa: E402
from mlx_diffusiongemma.tasks import TASKS  # noqa: E402
from mlx_diffusiongemma.toy import TOY_PATH, evaluate, held_out_prompts  # noqa: E402
from mlx_diffusiongemma.train import diffusion_loss  # noqa: E402

VOCAB_SIZE = 128
CANVAS = 24  # the longest reply, a sudoku grid (19 characters) and the end of turn, fits one canvas
GEOMETRY = dict(
    hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
    global_head_dim=48, num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=96,
    max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"] * 2,
)
SLIDING_WINDOW = 24  # shorter than a sudoku prompt (35 tokens), so the sliding layers do slide
# Ids 0-4, 105 and 106 are the released Gemma 4 ones; the characters and role words fill the gap.
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<|turn>", 106: "<turn|>"}
WORDS = {101: "user", 102: "model", 103: "system"}


def build_tokenizer(path: Path) -> None:
    """A character-level tokenizer (printable ASCII and newline) with the Gemma 4 markers and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {ch: 5 + i for i, ch in enumerate(chars)}  # ids 5..100
    vocab.update({tok: i for i, tok in {**SPECIAL, **WORDS}.items()})
    vocab.update({f"<unused{i}>": i for i in range(VOCAB_SIZE) if i not in vocab.values()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(w, normalized=False) for w in WORDS.values()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL.values()])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    tok.save(str(path / "tokenizer.json"))
    special_map = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "mask_token": "<mask>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def build_initial(path: Path, seed: int) -> None:
    """The random HF checkpoint (transformers' own initialisation) with our tokenizer and generation config."""
    build_checkpoint(path, layout="hub", seed=seed, num_layers=len(GEOMETRY["layer_types"]),
                     sliding_window=SLIDING_WINDOW, canvas_length=CANVAS, tokenizer=False, vocab_size=VOCAB_SIZE,
                     embed_std=None, **GEOMETRY)
    build_tokenizer(path)
    generation = {**RELEASED_GENERATION_CONFIG, "eos_token_id": [1, 106], "max_new_tokens": CANVAS}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --- data ---------------------------------------------------------------------------------------------------


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Prompt ids (chat template with the generation prompt) + answer ids, end of turn and pad to one canvas."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    reply = tokenizer.encode(answer, add_special_tokens=False) + tokenizer.encode("<turn|>\n", add_special_tokens=False)
    assert len(reply) <= CANVAS, answer
    return list(ids) + reply + [0] * (CANVAS - len(reply)), len(ids)


def batches(tokenizer, batch_size: int, seed: int, skip: set[str], names: list[str]):
    """Endless batches of one task each (drawn from `names`; a repeated name weighs more), all rows with the
    same prompt length (so one array, no padding)."""
    rng = random.Random(seed)
    while True:
        task = rng.choice(names)
        make = TASKS[task].make
        rows, length = [], None
        while len(rows) < batch_size:
            prompt, answer = make(rng)
            if prompt in skip:
                continue
            ids, plen = encode(tokenizer, prompt, answer)
            if length is None or plen == length:
                length = plen
                rows.append(ids)
        yield task, mx.array(rows, dtype=mx.int32), length


# --- training -----------------------------------------------------------------------------------------------


def train(model, tokenizer, *, iters: int, batch_size: int, lr: float, seed: int, tasks: list[str], log) -> dict:
    mx.random.seed(seed)
    warmup = max(1, iters // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, lr, warmup), optim.cosine_decay(lr, iters - warmup, lr * 0.05)], [warmup]
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(ids, plen, key):
        loss, m = diffusion_loss(model, ids, plen, key, canvas_length=CANVAS)
        return loss, (m["diffusion_loss"], m["encoder_loss"])

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    key = mx.random.key(seed)
    stream = batches(tokenizer, batch_size, seed, held_out_prompts(), tasks)
    recent: dict[str, list[float]] = {t: [] for t in TASKS}
    start = tic = time.perf_counter()
    reported = 0
    for it in range(1, iters + 1):
        task, ids, plen = next(stream)
        key, sub = mx.random.split(key)
        (loss, (diff, enc)), grads = loss_and_grad(ids, plen, sub)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(loss, diff, model.parameters(), opt.state)
        recent[task] = (recent[task] + [diff.item()])[-50:]
        if it % 100 == 0 or it == iters:
            per_task = ", ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in recent.items() if v)
            rate = (it - reported) / (time.perf_counter() - tic)
            log(f"iter {it}/{iters}: diffusion loss {per_task}; encoder {enc.item():.3f}; {rate:.1f} it/s")
            tic, reported = time.perf_counter(), it
    return {"iters": iters, "seconds": round(time.perf_counter() - start, 1),
            "final_diffusion_loss": {t: round(sum(v) / len(v), 4) if v else None for t, v in recent.items()}}


def write_trained(model, initial: Path, out: Path) -> None:
    """`out`: the initial HF folder with every trained tensor written back under its checkpoint name."""
    shutil.copytree(initial, out)
    trained = dict(tree_flatten(model.parameters()))
    tensors, written = load_file(str(initial / "model.safetensors")), set()
    for name in tensors:
        key = name + ".weight" if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else name
        if key in trained:  # the rest (the vision tower, rotary buffers) stays as initialised
            tensors[name] = np.array(trained[key].astype(mx.float32))
            written.add(key)
    assert written == set(trained), f"trained tensors with no checkpoint name: {sorted(set(trained) - written)[:3]}"
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def main_with(args) -> int:
    blas = reexec_with_openblas()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        initial, staged = Path(tmp) / "initial", Path(tmp) / "toy"
        stages = []
        if args.resume_from:  # a later stage: the previous stage's folder is the starting point
            shutil.copytree(args.resume_from, initial)
            previous = initial / "metrics.json"
            stages = json.loads(previous.read_text())["stages"] if previous.exists() else []
            previous.unlink(missing_ok=True)
        else:
            build_initial(initial, args.seed)
        model, tokenizer = load(initial)
        log(f"training {sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.2f}M parameters; {blas}")
        stage = {"command": "python scripts/train_toy.py " + " ".join(sys.argv[1:]),
                 **train(model, tokenizer, iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                         seed=args.seed, tasks=args.tasks, log=log)}
        metrics = {"blas": blas, "data": "mlx_diffusiongemma/tasks.py (fresh prompts every batch, held-out ones "
                   "skipped)", "stages": stages + [stage], "seconds": sum(s["seconds"] for s in stages + [stage])}
        write_trained(model, initial, staged)
        model, tokenizer = load(staged)  # score what was written, not what is in memory
        metrics["held_out"] = [evaluate(model, tokenizer, task, args.eval_prompts, drafter)
                               | {"drafter": drafter} for drafter in ("reference", "fast") for task in TASKS
                               if args.eval_prompts]
        for row in metrics["held_out"]:
            log(f"{row['drafter']:>9} {row['task']:>6}: accuracy {row['accuracy']:.3f}, "
                f"mean steps {row['mean_steps']:.2f}")
        (staged / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.move(str(staged), args.out)
    log(f"wrote {args.out}")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TOY_PATH, help="folder to write (replaced if it exists)")
    ap.add_argument("--iters", type=int, default=7500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=lambda v: v.split(","), default=sorted(TASKS),
                    help="comma-separated tasks to draw batches from; repeat one to weigh it more")
    ap.add_argument("--resume-from", type=Path, help="continue from a folder this script wrote (a later stage)")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts per task (0: skip)")
    args = ap.parse_args()
    if set(args.tasks) - set(TASKS):
        ap.error(f"unknown --tasks {sorted(set(args.tasks) - set(TASKS))}; choose from {sorted(TASKS)}")
    raise SystemExit(main_with(args))


if __name__ == "__main__":
    main()
