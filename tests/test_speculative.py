"""The speculative commit (`verify: "ar"`): the text is the causal encoder's greedy decoding, whatever drafts.

The defining property is checked against a plain greedy autoregressive loop over the same model (one token
encoded per step), on two tiny random configs (sliding windows shorter than a canvas, so roll-backs cross
evictions) and the toy; the encoder's causal logits are checked against transformers.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from checkpoints import build_checkpoint, load_reference
from mlx_diffusiongemma import load
from mlx_diffusiongemma.cache import PromptCache
from mlx_diffusiongemma.drafter import resolve_drafter
from mlx_diffusiongemma.errors import DrafterConfigError
from mlx_diffusiongemma.generate import denoise, prefill, stream_generate
from mlx_diffusiongemma.loader import load_model
from mlx_diffusiongemma.noise import MLXNoise

CONFIGS = {
    "6-layer per_layer, window 5": dict(layout="per_layer", seed=21, num_layers=6, sliding_window=5, canvas_length=8),
    "3-layer hub, window 4": dict(layout="hub", seed=22, num_layers=3, sliding_window=4, canvas_length=6),
}
# Drafter settings that change the drafts (and so what each verify accepts), never the text.
DRAFTERS = [
    {"max_denoising_steps": 1},
    {"max_denoising_steps": 4, "adaptive_stop": False},
    {"max_denoising_steps": 6, "acceptance": "confidence", "confidence_accept_threshold": 0.3},
    {"max_denoising_steps": 3, "stability_threshold": 0, "confidence_threshold": 50.0},
]
SEEDS = range(5)
NEW_TOKENS = 20


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("spec"), tokenizer=False, vocab_size=96, **CONFIGS[request.param])
    return path, load_model(path)


def greedy_ar(model, prompt: list[int], n: int, eos=()) -> list[int]:
    """The encoder as a plain autoregressive model: one token encoded per step, argmax of its logits."""
    cache = model.make_cache()
    logits = model.encode(mx.array([prompt]), cache, logits="last")
    out = []
    while len(out) < n:
        token = mx.argmax(logits[0, -1]).item()
        out.append(token)
        if token in eos:
            break
        logits = model.encode(mx.array([[token]]), cache, logits="last")
    return out


def speculative(model, prompt, overrides, seed, n=NEW_TOKENS, eos=(), cache=None):
    drafter = resolve_drafter("reference", model.generation_config, model.args.canvas_length,
                              {"verify": "ar", **overrides})
    events = denoise(model, mx.array([prompt]), drafter, MLXNoise(seed), 1, list(eos), 0, cache=cache,
                     max_tokens=n)
    commits = [e for e in events if e.kind == "commit"]
    return [t for e in commits for t in e.tokens[0].tolist()], commits


def _prompt(model, seed, length=7):
    return np.random.default_rng(100 + seed).integers(3, model.args.vocab_size, length).tolist()


@pytest.mark.parametrize("overrides", DRAFTERS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_output_is_the_encoders_greedy_decoding(tiny, overrides):
    _, model = tiny
    partial = 0
    for seed in SEEDS:
        prompt = _prompt(model, seed)
        got, commits = speculative(model, prompt, overrides, seed)
        assert got == greedy_ar(model, prompt, NEW_TOKENS), f"seed {seed}"
        partial += sum(len(c.tokens[0].tolist()) < c.drafted for c in commits)
    # Random weights disagree with most drafts: the roll-back path is what this exercises.
    assert partial > 0


def test_eos_inside_a_draft_ends_generation(tiny):
    _, model = tiny
    for seed in SEEDS:
        prompt = _prompt(model, seed)
        free = greedy_ar(model, prompt, NEW_TOKENS)
        eos = [free[5]]  # a token the encoder writes mid-way becomes "EOS"
        got, _ = speculative(model, prompt, DRAFTERS[1], seed, eos=eos)
        assert got == greedy_ar(model, prompt, NEW_TOKENS, eos=eos) == free[: free.index(eos[0]) + 1]


def test_cache_ends_as_if_only_accepted_tokens_were_encoded(tiny):
    _, model = tiny
    prompt = _prompt(model, 0, length=9)
    cache = model.make_cache()
    got, _ = speculative(model, prompt, DRAFTERS[0], 0, cache=cache)
    encoded = got  # no EOS: every committed token went through the verify pass into the cache
    fresh = model.make_cache()
    for token in [prompt] + [[t] for t in encoded]:  # one token at a time, as a plain AR loop would
        model.encode(mx.array([token]), fresh)
    for mine, ref in zip(cache, fresh):
        assert (mine.offset, mine.length) == (ref.offset, ref.length)
        for a, b in zip(mine.state, ref.state):
            assert np.abs(np.array(a) - np.array(b)).max() < 1e-5


def test_causal_logits_match_transformers(tiny):
    path, model = tiny
    ref = load_reference(path)
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 3 * model.args.sliding_window + 2))
    with torch.no_grad():
        hidden = ref.model.encoder(input_ids=torch.tensor(ids), cache=DynamicCache(config=ref.config.text_config))
        weight = ref.model.decoder.embed_tokens.weight
        expected = 30.0 * torch.tanh((hidden.last_hidden_state @ weight.T) / 30.0)
    cache = model.make_cache()
    got = model.encode(mx.array(ids), cache, logits="all")
    assert np.abs(np.array(got) - expected.numpy()).max() < 1e-4
    last = prefill(model, mx.array(ids), model.make_cache(), step=5, logits=True)  # chunked prefill
    assert np.abs(np.array(last[:, 0]) - expected[:, -1].numpy()).max() < 1e-4


def test_verify_min_prob_needs_ar(tiny):
    _, model = tiny
    with pytest.raises(DrafterConfigError, match="verify_min_prob"):
        resolve_drafter("reference", None, model.args.canvas_length, {"verify_min_prob": 0.5})


@pytest.fixture(scope="module")
def toy():
    return load("toy")


def test_toy_speculative_equals_greedy_and_reports_acceptance(toy):
    model, tokenizer = toy
    eos = [1, 106]
    for prompt in ("sort 70193", "add 482+037", "sudoku 1.3./3..2/.1.3/4..."):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        # Room for a thought (the template's thinking is on by default) and the answer: a reply that ends in EOS.
        want = greedy_ar(model, ids, 72, eos)
        assert want[-1] in eos, tokenizer.decode(want)
        for name in ("speculative", "reference"):
            drafter = resolve_drafter(name, model.generation_config, 24, {"verify": "ar"})
            responses = list(stream_generate(model, tokenizer, ids, drafter=drafter, max_tokens=72, seed=3))
            last = responses[-1]
            assert "".join(r.text for r in responses) == tokenizer.decode(want[:-1]), (prompt, name)
            assert last.finish_reason == "stop"
            assert sum(last.accepted_per_canvas) == len(want)
            assert last.encoder_passes == 1 + len(last.accepted_per_canvas)


def test_prompt_cache_turns_match_a_fresh_start(toy):
    """A chat's second turn through the prompt cache gives what a fresh start gives (greedy is deterministic)."""
    model, tokenizer = toy
    drafter = resolve_drafter("speculative", model.generation_config, 24)
    cache = PromptCache()
    messages = [{"role": "user", "content": "sort 9051"}]
    first = "".join(r.text for r in stream_generate(model, tokenizer, messages, drafter=drafter, prompt_cache=cache,
                                                    max_tokens=24, seed=0))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "add 120+305"}]
    turn = list(stream_generate(model, tokenizer, messages, drafter=drafter, prompt_cache=cache, max_tokens=24, seed=1))
    fresh = list(stream_generate(model, tokenizer, messages, drafter=drafter, max_tokens=24, seed=1))
    assert turn[-1].prompt_cached > 0
    assert "".join(r.text for r in turn) == "".join(r.text for r in fresh)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_verbose_and_bench_report_acceptance():
    result = _cli("generate", "--model", "toy", "--prompt", "sort 70193", "--drafter", "speculative", "--seed", "0",
                  "--no-live", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "01379"
    line = next(x for x in result.stderr.splitlines() if x.startswith("Verify:"))
    assert "tokens accepted per canvas 6 (6.00 per verify)" in line and "(1 decoder, 2 encoder)" in line
    result = _cli("bench", "--model", "toy", "--drafter", "speculative", "--canvases", "2", "--repeat", "1",
                  "--prompt-tokens", "10", "--json")
    assert result.returncode == 0, result.stderr
    per_canvas = json.loads(result.stdout)["tokens_per_canvas"]["median"]
    assert 1 <= per_canvas <= 24
