"""Train the bundled toy DiffusionGemma from scratch, reproducibly, and score it.

    pip install -e '.[test]'      # transformers + torch write the initial HF checkpoint

then the seventeen commands of README's "Toy model and demo" section are the stages that made
`mlx_diffusiongemma/toy_model/` (its `metrics.json` records each one's command, time and final losses; the
first two ran before `--data` existed, with the one-turn data `single` now names). The first learns sort and
sudoku; addition needs the second, weighted to it, to leave its plateau. The last fifteen (v2) teach
conversations (`dialogues.py`): 1-4 earlier turns, Gemma 4's thinking channel, and calls to a declared
calculator tool, with the encoder's next-token loss over every reply in the context; the sixth widens the
sliding window to 64 and gives thinking and tools half the dialogues each; the seventh and eighth teach the
operands as an addition's thought, sized to fill one canvas; stages 9-12 lean to thinking and sudoku, and
the next two, longer, to all of it and (the second) to tool calls; the last three give a sudoku a
one-canvas thought (its blanks per row) and lean tool calls to operands with leading zeros.
Under `mlx.launch -n N` each process trains on its share of the batch and the gradients are averaged: MLX's
CPU backend runs a process's ops on one core, so this is how both cores of this machine help.

The model is the real architecture at a small size: sliding and full attention layers, a dense MLP beside a
top-2-of-8 mixture of experts, the self-conditioning MLP, a character-level tokenizer with the Gemma 4 chat
format and its thinking and tool markers as single tokens, and a 24-token canvas. transformers builds the
random initial checkpoint (so the folder is HF-format by construction); MLX trains it with the
block-diffusion SFT loss of `train.diffusion_loss` on data drawn fresh from `tasks.py` and `dialogues.py`
(never a held-out prompt), then the trained tensors are written back under their HF names. Everything is
seeded; `metrics.json` records each stage's command, time and final losses and the held-out figures: accuracy
and denoising steps per task for the `reference` and `fast` drafters, and (reference drafter) the 3rd turn of
a conversation, thinking on, and the calculator round trip.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "benchmarks")]

from checkpoints import CHAT_TEMPLATE, RELEASED_GENERATION_CONFIG, build_checkpoint  # noqa: E402

from openblas import reexec_with_openblas  # noqa: E402

from mlx_diffusiongemma.dialogues import MARKERS, make_dialogue  # noqa: E402
from mlx_diffusiongemma.loader import load  # noqa: E402
from mlx_diffusiongemma.tasks import TASKS  # noqa: E402
from mlx_diffusiongemma.toy import (  # noqa: E402
    TOY_PATH, evaluate, evaluate_thinking, evaluate_tools, evaluate_turns, held_out_prompts,
)
from mlx_diffusiongemma.train import diffusion_loss  # noqa: E402

VOCAB_SIZE = 128
CANVAS = 24  # the longest reply, a sudoku grid (19 characters) and the end of turn, fits one canvas
GEOMETRY = dict(
    hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
    global_head_dim=48, num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=96,
    max_position_embeddings=1024, layer_types=["sliding_attention", "full_attention"] * 2,
)
PROMPT_BUCKET = 32  # prompts within this many tokens of each other share a batch (the shorter ones padded)
SLIDING_WINDOW = 24  # shorter than a sudoku prompt (35 tokens), so the sliding layers do slide
# From stage 6 on, 64 (`--sliding-window`): with 24, a canvas's later positions lost sight of the prompt, so a
# tool call's first operand and an answer after a thought (a canvas later) were guessed; conversations and
# tool declarations are still longer than 64 tokens, so the layers still slide.
# Ids 0-4, 105 and 106 are the released Gemma 4 ones; the characters and role words fill the gap. The
# thinking and tool markers (v2) are single tokens as in the released tokenizer, in formerly unused ids, and
# not "special", so decoding never strips them (the chat and tool-call parsers read them).
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 105: "<|turn>", 106: "<turn|>"}
WORDS = {101: "user", 102: "model", 103: "system", 104: "tool", **dict(zip(range(107, 117), MARKERS))}
TOOL_RESPONSE = 114  # `<|tool_response>`: an end of generation, as id 50 is in the released config


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


def build_initial(path: Path, seed: int, sliding_window: int) -> None:
    """The random HF checkpoint (transformers' own initialisation) with our tokenizer and generation config."""
    build_checkpoint(path, layout="hub", seed=seed, num_layers=len(GEOMETRY["layer_types"]),
                     sliding_window=sliding_window, canvas_length=CANVAS, tokenizer=False, vocab_size=VOCAB_SIZE,
                     embed_std=None, **GEOMETRY)
    build_tokenizer(path)
    generation = {**RELEASED_GENERATION_CONFIG, "eos_token_id": [1, 106, TOOL_RESPONSE], "max_new_tokens": CANVAS}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def upgrade(path: Path, sliding_window: int | None) -> None:
    """Bring a folder of an earlier stage to this script's format: the tokenizer with every marker, the
    context length and the end-of-generation ids (the weights are untouched; the new ids were unused rows),
    and the sliding window if one is given."""
    build_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = GEOMETRY["max_position_embeddings"]
    if sliding_window:
        config["text_config"]["sliding_window"] = sliding_window
    config["eos_token_id"] = [1, 106, TOOL_RESPONSE]
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [1, 106, TOOL_RESPONSE]
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --- data ---------------------------------------------------------------------------------------------------


def encode(tokenizer, dialogue) -> tuple[list[int], int, list[int]]:
    """(prompt ids + reply ids, end of turn and pads up to whole canvases; the prompt length; a mask of the
    tokens the model wrote: every earlier reply and this one, for the encoder's next-token loss)."""
    def render(messages, gen):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=gen, **dialogue.template))

    ids = render(dialogue.messages, True)
    mask = [0] * len(ids)
    for i, m in enumerate(dialogue.messages):
        if m["role"] == "assistant":  # its span: after `<|turn>model\n`, up to and with its `<turn|>`
            a, b = len(render(dialogue.messages[:i], True)), len(render(dialogue.messages[: i + 1], False))
            mask[a : b - 1] = [1] * (b - 1 - a)
    reply = tokenizer.encode(dialogue.target + "<turn|>\n", add_special_tokens=False)
    pad = -len(reply) % CANVAS
    return ids + reply + [0] * pad, len(ids), mask + [1] * (len(reply) - 1) + [0] * (pad + 1)


def batches(tokenizer, batch_size: int, seed: int, skip: set[str], names: list[str], single: bool,
            shares: dict[str, float]):
    """Endless `(kinds, ids, prompt length, masks, pads)` batches of dialogues whose tasks are drawn from `names`
    (a repeated name weighs more); `single`: one-turn prompts without thinking or tools, as stages 1-2 had;
    `shares`: how often thinking is on and tools are declared (`make_dialogue`'s defaults unless given).
    Dialogues wait in buckets of equal reply blocks and similar prompt lengths until one holds a batch; shorter
    prompts get pad tokens in front (`pads`), hidden by `diffusion_loss(prompt_pad=...)`. Buckets by exact
    length (as v2's first 800 iterations had) starve long conversations: 5% of rows were calls, not 13%."""
    rng = random.Random(seed)
    buckets: dict[tuple[int, int], list] = {}
    while True:
        options = dict(earlier=0, thinking=False, tools=[]) if single else shares
        dialogue = make_dialogue(rng, skip, task=rng.choice(names), **options)
        ids, plen, mask = encode(tokenizer, dialogue)
        key = ((len(ids) - plen) // CANVAS, plen // PROMPT_BUCKET)
        bucket = buckets.setdefault(key, [])
        bucket.append((dialogue.kind if dialogue.kind != "answer" else dialogue.task, ids, plen, mask))
        if len(bucket) == batch_size:
            del buckets[key]
            longest = max(p for _, _, p, _ in bucket)
            pads = [longest - p for _, _, p, _ in bucket]
            rows = [[0] * n + ids for n, (_, ids, _, _) in zip(pads, bucket)]
            masks = [[0] * n + m for n, (_, _, _, m) in zip(pads, bucket)]
            yield [k for k, *_ in bucket], rows, longest, masks, pads


def prefetched(stream, depth: int = 8):
    """`stream`'s items made on a thread, so building dialogues overlaps the training step (MLX computes
    without the GIL)."""
    items: queue.Queue = queue.Queue(depth)
    threading.Thread(target=lambda: [items.put(x) for x in stream], daemon=True).start()
    while True:
        yield items.get()


# --- training -----------------------------------------------------------------------------------------------


def average(grads, group):
    """The mean of every process's gradients, in one all-reduce: with one per tensor, ranks whose graphs differ
    in shape could schedule them in different orders and wait on each other forever."""
    flat = tree_flatten(grads)
    total = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for _, g in flat]), group=group) / group.size()
    out, at = [], 0
    for name, g in flat:
        out.append((name, total[at : at + g.size].reshape(g.shape)))
        at += g.size
    return tree_unflatten(out)


def train(model, tokenizer, *, iters: int, batch_size: int, lr: float, seed: int, tasks: list[str], single: bool,
          shares: dict[str, float], log) -> dict:
    # Under `mlx.launch -n N`, each of N processes trains on batch_size / N rows of its own data and the
    # gradients are averaged: MLX's CPU backend runs one process's ops on one core, so this is how N cores help.
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    seed_r = seed + 7919 * rank
    mx.random.seed(seed_r)
    warmup = max(1, iters // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, lr, warmup), optim.cosine_decay(lr, iters - warmup, lr * 0.05)], [warmup]
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(ids, plen, key, mask, pads):
        loss, m = diffusion_loss(model, ids, plen, key, canvas_length=CANVAS, encoder_mask=mask, prompt_pad=pads)
        return loss, (m["diffusion_loss"], m["encoder_loss"])

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    key = mx.random.key(seed_r)
    stream = prefetched(batches(tokenizer, batch_size // size, seed_r, held_out_prompts(), tasks, single, shares))
    recent: dict[str, list[float]] = {}
    start = tic = time.perf_counter()
    reported = 0
    for it in range(1, iters + 1):
        kinds, rows, plen, masks, pads = next(stream)
        ids, mask = mx.array(rows, dtype=mx.int32), mx.array(masks, dtype=mx.float32)
        key, sub = mx.random.split(key)
        (loss, (diff, enc)), grads = loss_and_grad(ids, plen, sub, mask, mx.array(pads, dtype=mx.int32) if any(pads) else None)
        if size > 1:
            grads = average(grads, group)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(loss, diff, model.parameters(), opt.state)
        kind = max(set(kinds), key=kinds.count)  # the batch's loss, filed under its most common kind
        recent[kind] = (recent.get(kind, []) + [diff.item()])[-50:]
        if it % 100 == 0 or it == iters or (it <= 100 and it % 20 == 0):
            per_task = ", ".join(f"{t} {sum(v) / len(v):.3f}" for t, v in recent.items() if v)
            rate = (it - reported) / (time.perf_counter() - tic)
            log(f"iter {it}/{iters}: diffusion loss {per_task}; encoder {enc.item():.3f}; {rate:.1f} it/s")
            tic, reported = time.perf_counter(), it
    return {"iters": iters, "seconds": round(time.perf_counter() - start, 1),
            "final_diffusion_loss": {t: round(sum(v) / len(v), 4) for t, v in sorted(recent.items())}}


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


def _job(folder: str, kind: str, task: str, n: int, drafter: str) -> tuple[str, dict]:
    model, tokenizer = load(folder)
    if kind == "held_out":
        return kind, evaluate(model, tokenizer, task, n, drafter) | {"drafter": drafter}
    if kind == "tools":
        return kind, evaluate_tools(model, tokenizer, n)
    scorer = evaluate_turns if kind == "turn3" else evaluate_thinking
    return kind, scorer(model, tokenizer, task, n)


def score(folder: Path, n: int, log, workers: int = 2, conversations: int | None = None) -> dict:
    """Held-out figures for `metrics.json`: one-turn accuracy per drafter, and (reference drafter) the 3rd
    turn of a conversation, thinking on, and the calculator round trip; jobs run in `workers` processes."""
    jobs = [("held_out", t, d) for d in ("reference", "fast") for t in TASKS]
    jobs += [(k, t, "reference") for k in ("turn3", "thinking") for t in TASKS] + [("tools", "add", "reference")]
    counts = {k: n if k == "held_out" else conversations or min(n, 200) for k, _, _ in jobs}
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.starmap(_job, [(str(folder), k, t, counts[k], d) for k, t, d in jobs])
    out: dict = {"held_out": [], "conversations": {"turn3": [], "thinking": [], "tools": None}}
    for kind, row in done:
        log(f"{kind} {json.dumps(row)}")
        if kind == "held_out":
            out["held_out"].append(row)
        elif kind == "tools":
            out["conversations"]["tools"] = row
        else:
            out["conversations"][kind].append(row)
    return out


def main_with(args) -> int:
    blas = reexec_with_openblas()
    rank = mx.distributed.init().rank()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)  # noqa: E731
    if args.score_only:  # a written folder scored again (e.g. with more prompts), its metrics.json updated
        path = args.score_only / "metrics.json"
        scores = score(args.score_only, args.eval_prompts, log, conversations=args.conversation_prompts)
        path.write_text(json.dumps(json.loads(path.read_text()) | scores, indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        initial, staged = Path(tmp) / "initial", Path(tmp) / "toy"
        stages = []
        if args.resume_from:  # a later stage: the previous stage's folder is the starting point
            shutil.copytree(args.resume_from, initial)
            previous = initial / "metrics.json"
            stages = json.loads(previous.read_text())["stages"] if previous.exists() else []
            previous.unlink(missing_ok=True)
            upgrade(initial, args.sliding_window)
        else:
            build_initial(initial, args.seed, args.sliding_window or SLIDING_WINDOW)
        model, tokenizer = load(initial)
        log(f"training {sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.2f}M parameters; {blas}")
        stage = {"command": "python scripts/train_toy.py " + " ".join(sys.argv[1:]),
                 **train(model, tokenizer, iters=args.iters, batch_size=args.batch_size, lr=args.learning_rate,
                         seed=args.seed, tasks=args.tasks, single=args.data == "single", log=log,
                         shares={k: v for k, v in (("thinking_share", args.thinking_share),
                                                   ("tools_share", args.tools_share),
                                                   ("zero_calls", args.zero_calls)) if v is not None})}
        metrics = {"blas": blas, "data": "mlx_diffusiongemma/tasks.py (fresh prompts every batch, held-out ones "
                   "skipped)", "stages": stages + [stage],
                   "seconds": round(sum(s["seconds"] for s in stages + [stage]), 1)}
        if rank:  # rank 0 holds the same weights and writes them
            return 0
        write_trained(model, initial, staged)
        if args.eval_prompts:  # score what was written, not what is in memory
            metrics |= score(staged, args.eval_prompts, log, conversations=args.conversation_prompts)
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
    ap.add_argument("--data", choices=("dialogues", "single"), default="dialogues",
                    help="dialogues (v2): earlier turns, thinking and tool calls; single: one-turn prompts (v1)")
    ap.add_argument("--thinking-share", type=float, help="share of dialogues with thinking on (default 0.3)")
    ap.add_argument("--tools-share", type=float, help="share of dialogues that declare tools (default 0.35)")
    ap.add_argument("--zero-calls", type=float,
                    help="share of tool-call dialogues whose addition has an operand under 100 (default: as drawn)")
    ap.add_argument("--sliding-window", type=int,
                    help=f"the sliding layers' window (default: the resumed folder's, else {SLIDING_WINDOW})")
    ap.add_argument("--resume-from", type=Path, help="continue from a folder this script wrote (a later stage)")
    ap.add_argument("--score-only", type=Path, help="only score this folder (written by this script) again")
    ap.add_argument("--eval-prompts", type=int, default=500, help="held-out prompts per task (0: skip)")
    ap.add_argument("--conversation-prompts", type=int,
                    help="held-out prompts per conversation figure (3rd turn, thinking, tools; default: --eval-prompts, "
                         "at most 200)")
    args = ap.parse_args()
    if set(args.tasks) - set(TASKS):
        ap.error(f"unknown --tasks {sorted(set(args.tasks) - set(TASKS))}; choose from {sorted(TASKS)}")
    raise SystemExit(main_with(args))


if __name__ == "__main__":
    main()
