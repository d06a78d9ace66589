"""The bundled toy model: HF-format parity, held-out accuracy, `demo`, reproducible training, LoRA on a new task."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from checkpoints import load_reference
from mlx_diffusiongemma.loader import load
from mlx_diffusiongemma.tasks import GRIDS, TASKS, examples
from mlx_diffusiongemma.dialogues import (
    CALCULATOR, call_message, call_text, make_dialogue, operands, parse_call, split_thought, think_wrap, thought,
)
from mlx_diffusiongemma.toy import (
    TOY_PATH, evaluate, evaluate_thinking, evaluate_tools, evaluate_turns, held_out, held_out_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mlx_diffusiongemma"]


def _run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def toy():
    return load("toy")


def test_checkers_accept_right_and_reject_wrong_answers():
    rng = random.Random(0)
    for name, task in TASKS.items():
        for _ in range(50):
            prompt, answer = task.make(rng)
            assert task.check(prompt, answer), (prompt, answer)
            wrong = answer[:-1] + ("1" if answer[-1] != "1" else "2")
            assert not task.check(prompt, wrong), (prompt, wrong)
    assert len(GRIDS) == 288  # every solved 4x4 sudoku
    assert not TASKS["sudoku"].check("sudoku 1.../..../..../....", "1234/3412/2143/4312")


def test_sudoku_grids_are_every_solution_in_product_order():
    """The pruned search finds the same grids, in the same order, as filtering every product of rows (so
    seeded puzzles, and the held-out set, do not change)."""
    from mlx_diffusiongemma.tasks import _solutions, _valid, grids

    found = grids()
    assert len(found) == 288 and all(_valid(g) for g in found)
    assert found == sorted(found) and len({repr(g) for g in found}) == 288  # product order: lexicographic
    assert _solutions([[0] * 4] * 4) == found and _solutions(found[7]) == [found[7]]


def test_held_out_prompts_are_never_trained_on():
    held = held_out_prompts()
    assert len(held) == 3 * 2000
    train_like = {p for task in TASKS for p, _ in examples(task, 2000, seed=0, exclude=held)}
    assert not held & train_like


def test_toy_is_small_and_hf_format(toy):
    files = {p.name for p in TOY_PATH.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors", "metrics.json"} <= files
    assert sum(p.stat().st_size for p in TOY_PATH.iterdir()) <= 15 * 2**20
    model, tokenizer = toy
    assert "<|turn>model" in tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                            add_generation_prompt=True, tokenize=False)
    # transformers reads the same folder and computes the same decoder logits.
    reference = load_reference(TOY_PATH)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "add 12+30"}], add_generation_prompt=True)
    canvas = list(range(5, 5 + model.args.canvas_length))
    cache = model.make_cache()
    model.encode(mx.array([ids]), cache)
    ours = np.array(model.decode(mx.array([canvas]), cache))
    ref_cache = DynamicCache(config=reference.config.text_config)
    with torch.no_grad():
        reference.model.encoder(input_ids=torch.tensor([ids]), cache=ref_cache)
        expected = reference(cache=ref_cache, decoder_input_ids=torch.tensor([canvas])).logits
    assert np.abs(ours - expected.float().numpy()).max() < 1e-4


def test_toy_solves_held_out_prompts(toy):
    """A sample of the held-out evaluation (metrics.json holds the full 500-prompt figures)."""
    model, tokenizer = toy
    for task in TASKS:
        result = evaluate(model, tokenizer, task, n=20, drafter="reference")
        assert result["accuracy"] >= 0.9, result
        assert result["mean_steps"] < 0.5 * 48, result  # the adaptive stop fires well before the cap


def test_shipped_metrics_meet_the_bar():
    """Issue #14's bars on 500 held-out prompts per task (200 per conversation row): one turn >= 96%; the 3rd
    turn, thinking on, the calculator's calls and the answers after its response >= 95%."""
    metrics = json.loads((TOY_PATH / "metrics.json").read_text())
    reference = [row for row in metrics["held_out"] if row["drafter"] == "reference"]
    assert {row["task"] for row in reference} == set(TASKS)
    assert all(row["prompts"] == 500 and row["accuracy"] >= 0.96 for row in reference), reference
    turns, thinking = metrics["conversations"]["turn3"], metrics["conversations"]["thinking"]
    assert {r["task"] for r in turns} == {r["task"] for r in thinking} == set(TASKS)
    assert all(r["prompts"] >= 200 and r["accuracy"] >= 0.95 for r in turns), turns
    assert all(r["prompts"] >= 200 and r["accuracy"] >= 0.95 for r in thinking), thinking
    tools = metrics["conversations"]["tools"]
    assert tools["prompts"] >= 200 and tools["tool_calls"] >= 0.95 and tools["final_answers"] >= 0.95, tools


def test_dialogues_are_what_the_template_renders():
    """The replies the toy learns are Gemma 4's formats: a tool call equal to the template's rendering of the
    OpenAI-shaped message, mlx-lm's Gemma 4 parser reads it back, and a thought's sums are right."""
    model, tokenizer = load("toy")
    call = call_message("add 482+037")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "add 482+037"}, call], tokenize=False)
    assert call_text("add 482+037") + "<turn|>" in text
    assert parse_call(call_text("add 482+037")) == {"name": "calculator", "arguments": {"a": 482, "b": 37}}
    assert parse_call("<|tool_call>call:calculator{a:482<tool_call|>") is None
    assert thought("add 482+037") == "adding 482+037"
    assert split_thought("<|channel>thought\nx<channel|>0519") == ("x", "0519")
    assert split_thought("0519") == (None, "0519")
    for marker in ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|\"|>", "<|think|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    rng = random.Random(0)
    kinds = {make_dialogue(rng).kind for _ in range(200)}
    assert kinds == {"answer", "call", "after_tool"}
    declared = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[CALCULATOR],
                                             tokenize=False)
    assert "<|tool>declaration:calculator{" in declared


def test_thoughts_end_on_a_canvas_boundary_and_calls_lean_to_leading_zeros():
    """An addition's and a sudoku's thought fill exactly one canvas, so the answer starts the next (a grid
    split across canvases is solved less often); `zero_calls` draws tool calls with an operand under 100."""
    model, tokenizer = load("toy")
    for task in ("add", "sudoku"):
        for prompt, _ in held_out(task, 20):
            ids = tokenizer.encode(think_wrap(thought(prompt), ""), add_special_tokens=False)
            assert len(ids) == model.args.canvas_length, (prompt, thought(prompt))
    assert thought("sudoku 4..2/.234/..../3..1") == "blanks 2,1,4,2"

    for share, low, high in ((0.0, 0.1, 0.3), (1.0, 1.0, 1.0)):
        rng = random.Random(3)
        drawn = [make_dialogue(rng, task="add", thinking=False, tools=[CALCULATOR], zero_calls=share)
                 for _ in range(400)]
        drawn = [d for d in drawn if d.kind == "call"]
        zeros = sum(min(operands(d.prompt).values()) < 100 for d in drawn) / len(drawn)
        assert low <= zeros <= high, (share, zeros)
        assert all(d.messages[-1]["content"] == d.prompt and d.target == call_text(d.prompt) for d in drawn)


def test_toy_converses_thinks_and_calls_tools(toy):
    """A sample of the conversation evaluation (metrics.json holds the 500-prompt figures): at least 6 of 8
    right in each row, which a toy at 90% (the weakest shipped rows) meets 96% of the time and a broken path
    (a misplaced marker, a lost turn) never."""
    model, tokenizer = toy
    for task in TASKS:
        assert evaluate_turns(model, tokenizer, task, n=8)["accuracy"] >= 0.75
        assert evaluate_thinking(model, tokenizer, task, n=8)["accuracy"] >= 0.75, task
    tools = evaluate_tools(model, tokenizer, n=8)
    assert tools["tool_calls"] >= 0.75 and tools["final_answers"] >= 0.75, tools


def test_chat_answers_three_turns_through_a_pipe():
    """Three mixed tasks in one `chat` session (one prompt cache): every answer right; with thinking on, every
    reply a thought and then an answer, at least two of three right (the toy's thinking rows are 95-99%)."""
    prompts = [held_out("sort", 3)[2][0], held_out("add", 3)[2][0], held_out("sudoku", 3)[2][0]]
    for config in ('{"enable_thinking": false}', '{"enable_thinking": true}'):
        r = subprocess.run([*CLI, "chat", "--model", "toy", "--seed", "0", "--max-tokens", "72",
                            "--chat-template-config", config], input="\n".join(prompts) + "\n",
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stderr
        opening = "<|channel>thought\n"  # a thought's own line break: one reply per printed line otherwise
        replies = r.stdout.replace(opening, "<|channel>thought ").splitlines()
        assert len(replies) == 3, r.stdout
        right = 0
        for prompt, reply in zip(prompts, replies):
            note, answer = split_thought(reply.replace("<|channel>thought ", opening))
            assert (note is not None) == ("true" in config), reply
            right += TASKS[prompt.split()[0]].check(prompt, answer)
        assert right >= (2 if "true" in config else 3), (prompts, replies)


def test_demo_runs_offline():
    r = _run(*CLI, "demo", "--no-live", "--count", "1", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == len(TASKS) and "denoising steps" in r.stdout
    assert "solved" in r.stderr
    bad = _run(*CLI, "demo", "--task", "chess")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown --task") and "Traceback" not in bad.stderr


def test_training_script_is_deterministic(tmp_path):
    """Two short runs of the documented script write identical weights (so a full run reproduces the toy)."""
    outs = []
    for name in ("a", "b"):
        r = _run(sys.executable, "scripts/train_toy.py", "--out", tmp_path / name, "--iters", "4",
                 "--batch-size", "4", "--eval-prompts", "0")
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    model, _ = load(tmp_path / "a")
    assert model.args.canvas_length == 24


def test_lora_on_the_toy_learns_a_new_task(tmp_path):
    """Fine-tune the toy on reversing digits (a task it never saw): the task loss falls; generate uses it."""
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"reverse {digits}", "completion": digits[::-1]})
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = tmp_path / "adapters"
    r = _run(*CLI, "finetune", "--model", "toy", "--data", data, "--val-data", data, "--val-every", "30",
             "--iters", "30", "--batch-size", "4", "--learning-rate", "3e-3", "--adapter-path", adapters)
    assert r.returncode == 0, r.stderr
    val = [float(line.split("val loss ")[1]) for line in r.stderr.splitlines() if "val loss" in line]
    assert len(val) >= 2 and val[-1] < 0.7 * val[0], val  # fixed-noise loss on the task, before and after
    g = _run(*CLI, "generate", "--model", "toy", "--adapter-path", adapters, "--prompt", "reverse 123",
             "--seed", "0", "--no-live", "--quiet")
    assert g.returncode == 0, g.stderr
    plain = _run(*CLI, "generate", "--model", "toy", "--prompt", "reverse 123", "--seed", "0", "--no-live",
                 "--quiet")
    assert g.stdout != plain.stdout
