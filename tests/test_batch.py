"""Batched denoising: a request's output does not depend on the rest of the batch.

Every batched request must equal `stream_generate` with the same seed, token for token and step for step, on
two tiny random configs, with prompts of mixed lengths (some longer than the sliding window, so rows are
padded differently on sliding and full layers), rows that stop early (EOS, the adaptive stop firing mid-canvas,
a token budget that ends mid-canvas), rows that commit at different decoder passes while the others draft on,
and a request that joins after the first pass, mid-canvas.
"""

import json

import mlx.core as mx
import pytest

from checkpoints import build_checkpoint
from figures import record
from mlx_diffusiongemma import load, stream_generate
from mlx_diffusiongemma.batch import BatchGenerator, MemoryBudgetError, batch_generate, request_bytes, stream_batch
from mlx_diffusiongemma.errors import DrafterConfigError

# name -> (builder kwargs, generation_config changes). Stability off (0) and a confidence bound the falling
# temperature crosses mid-canvas make the adaptive stop fire on random weights (as in test_generation_parity);
# a few EOS ids end some rows after one or two canvases and leave others running.
CONFIGS = {
    "6-layer per_layer, window 8": (
        dict(layout="per_layer", seed=11, num_layers=6, sliding_window=8, embed_std=0.2, vocab_size=512),
        dict(max_denoising_steps=8, stability_threshold=0, confidence_threshold=4.0,
             eos_token_id=[1, 106, 300, 301, 302, 303, 304, 305]),
    ),
    "3-layer hub, window 6": (
        dict(layout="hub", seed=12, num_layers=3, sliding_window=6, embed_std=0.2, vocab_size=512),
        dict(max_denoising_steps=10, stability_threshold=0, confidence_threshold=4.0,
             eos_token_id=[1, 106, 200, 201, 202, 203, 204, 205]),
    ),
}
SEEDS = range(5)
PROMPT_LENGTHS = [3, 17, 9, 30]  # the last request (length 12) joins after the first decoder pass
MAX_TOKENS = [32, 32, 20, 32, 28]


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    build, gen = CONFIGS[request.param]
    path = build_checkpoint(tmp_path_factory.mktemp("batch"), **build)
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **gen}))
    return request.param, *load(path)


def _prompts(seed):
    rng = mx.random.key(1000 + seed)
    lengths = PROMPT_LENGTHS + [12]
    return [mx.random.randint(3, 512, (n,), key=mx.random.split(rng, 6)[i]).tolist() for i, n in enumerate(lengths)]


def _summary(responses):
    """What must agree: tokens, text, steps per canvas, finish reason and the pass counts."""
    last = responses[-1]
    tokens = [t for r in responses for t in r.tokens]
    return (tokens, "".join(r.text for r in responses), last.steps_per_canvas, last.finish_reason,
            last.generation_tokens, last.encoder_passes, last.canvases)


def _alone(model, tokenizer, prompt, seed, max_tokens):
    return _summary(list(stream_generate(model, tokenizer, prompt, seed=seed, max_tokens=max_tokens)))


def _batched(model, tokenizer, prompts, seeds):
    """All but the last prompt start together; the last joins after the first decoder pass."""
    batch = BatchGenerator(model, tokenizer)
    ids = [batch.submit(p, seed=s, max_tokens=m) for p, s, m in zip(prompts[:-1], seeds, MAX_TOKENS)]
    out = {i: [] for i in ids}
    seen = {"padded": False, "widest": 0, "staggered": False}

    def step():
        rows = len(batch.engine.rows) + len(batch.engine.queue)
        responses = list(batch.step())  # one per row that committed a canvas in this pass
        for request, response in responses:
            out[request].append(response)
        cache = batch.engine.cache
        seen["padded"] |= any(lo or hi < c.length for c in cache for lo, hi in zip(c.lo, c.hi))
        seen["widest"] = max(seen["widest"], len(batch.engine.rows))
        seen["staggered"] |= 0 < len({r for r, _ in responses}) < rows

    step()
    late = batch.submit(prompts[-1], seed=seeds[-1], max_tokens=MAX_TOKENS[-1])
    out[late] = []
    while not batch.idle:
        step()
    return [_summary(out[i]) for i in [*ids, late]], seen


def test_batched_equals_unbatched(tiny):
    name, model, tokenizer = tiny
    cap = model.generation_config["max_denoising_steps"]
    reasons, early_stops, canvases = [], 0, 0
    for seed in SEEDS:
        prompts = _prompts(seed)
        seeds = [100 * seed + i for i in range(len(prompts))]
        got, seen = _batched(model, tokenizer, prompts, seeds)
        for i, (prompt, s, m) in enumerate(zip(prompts, seeds, MAX_TOKENS)):
            assert got[i] == _alone(model, tokenizer, prompt, s, m), f"{name}, seed {seed}, request {i}"
        assert seen["padded"] and seen["widest"] >= 4, "the batch must hold padded rows side by side"
        assert seen["staggered"], "some rows must commit while others draft on"
        reasons += [g[3] for g in got]
        early_stops += sum(steps < cap for g in got for steps in g[2])
        canvases += sum(len(g[2]) for g in got)
    record(f"batch parity [{name}]: requests, stopped by EOS, adaptive stops / canvases",
           f"{len(reasons)}, {reasons.count('stop')}, {early_stops} / {canvases}")
    assert 0 < reasons.count("stop") < len(reasons), "some rows must end by EOS while others run on"
    assert 0 < early_stops < canvases, "the adaptive stop must fire in some canvases, not all"


def test_memory_budget_makes_requests_wait(tiny):
    _, model, tokenizer = tiny
    prompts = _prompts(1)[:3]
    kv, act = request_bytes(model.args, model.dtype, max(map(len, prompts)), 24)
    budget = 2 * (kv + act)  # room for two of the three
    batch = BatchGenerator(model, tokenizer, memory_budget=budget)
    ids = [batch.submit(p, seed=i, max_tokens=24) for i, p in enumerate(prompts)]
    out = {i: [] for i in ids}
    first = True
    while not batch.idle:
        for request, response in batch.step():
            out[request].append(response)
        if first:
            assert len(batch.engine.queue) == 1  # the third waited: two filled the budget
            first = False
        assert batch.engine.batch_bytes() <= budget
    for i, prompt in zip(ids, prompts):  # the waiting request ran later, to the same text
        assert _summary(out[i]) == _alone(model, tokenizer, prompt, i, 24)
    huge = list(range(3, 500))
    assert sum(request_bytes(model.args, model.dtype, len(huge), 4000)) > budget
    with pytest.raises(MemoryBudgetError, match="budget"):
        batch.submit(huge, max_tokens=4000)  # could never fit, even alone: refused at submit, nothing queued
    assert batch.idle


def test_batch_generate_and_speculative_refusal(tiny):
    _, model, tokenizer = tiny
    prompts = _prompts(2)[:3]
    final = batch_generate(model, tokenizer, prompts, seeds=[5, 6, 7], max_tokens=16)
    for response, prompt, seed in zip(final, prompts, [5, 6, 7]):
        alone = list(stream_generate(model, tokenizer, prompt, seed=seed, max_tokens=16))
        assert response.tokens == [t for r in alone for t in r.tokens]
        assert response.text == "".join(r.text for r in alone) and response.seed == seed
    # A caller may stop reading a step early: the step still happened for every row.
    batch = BatchGenerator(model, tokenizer)
    requests = [batch.submit(p, seed=s, max_tokens=16) for p, s in zip(prompts, [5, 6, 7])]
    seen = {r: [] for r in requests}
    while not batch.idle:
        for request, response in batch.step():
            seen[request].append(response)
            break
    full = {i: [] for i in range(3)}
    for i, response in stream_batch(model, tokenizer, prompts, seeds=[5, 6, 7], max_tokens=16):
        full[i].append(response)
    assert not batch.progress and sum(map(len, seen.values())) > 0
    for i, r in enumerate(requests):
        assert [x.tokens for x in seen[r]] == [full[i][x.canvas].tokens for x in seen[r]]
    with pytest.raises(DrafterConfigError) as err:
        batch_generate(model, tokenizer, prompts, drafter="speculative")
    assert "\n" not in str(err.value) and 'verify "none"' in str(err.value)


def test_a_finished_row_hands_over_its_whole_conversation(tiny):
    """`finished` gets a cache of the row's own holding its prompt and whole reply (to EOS or the budget):
    the K/V a fresh prefill of those ids writes, whatever padding or sliding eviction the batch had."""
    from mlx_diffusiongemma.generate import prefill
    from mlx_diffusiongemma.hidden import visible

    _, model, tokenizer = tiny
    batch = BatchGenerator(model, tokenizer, max_batch=4)
    handed = {}
    batch.engine.finished = lambda request, cache, ids: handed.setdefault(request, (cache, ids))
    prompts = _prompts(0)[:4]
    requests = [batch.submit(p, max_tokens=m, seed=s) for s, (p, m) in enumerate(zip(prompts, MAX_TOKENS))]
    replies, ends = {r: [] for r in requests}, {}
    while not batch.idle:
        for request, response in batch.step():
            replies[request] += response.tokens
            ends[request] = response.finish_reason
    assert sorted(handed) == requests
    for request, prompt in zip(requests, prompts):
        cache, ids = handed[request]
        eos = [ids[-1]] if ends[request] == "stop" else []  # the EOS the model wrote, which a chat re-renders
        written = visible(ids[len(prompt):], batch.hidden)  # the held ids carry hidden ones (pad...) too
        # A budget counts hidden ids in the batch's rows (not in the text): the held reply may end earlier.
        reply = replies[request] + eos if ends[request] == "stop" else replies[request][: len(written)]
        assert ids[: len(prompt)] == prompt and written == reply
        fresh = model.make_cache()
        prefill(model, mx.array([ids]), fresh)
        for own, want in zip(cache, fresh):
            assert (own.length, own.offset) == (want.length, want.offset)
            for got, ref in zip(own.state, want.state):
                assert mx.allclose(got, ref, atol=1e-4).item()


def test_per_row_offsets_stay_put_while_layers_append(tiny_ckpt):
    """A cache whose offset is one array per row gives the positions an int offset gives, in every layer: each
    layer's rope holds the offset array, so a cache that advanced it in place (`+=`) shifted every later layer
    by the prompt's length."""
    from mlx_diffusiongemma.cache import ArrayCache
    from mlx_diffusiongemma.loader import load_model

    model = load_model(tiny_ckpt)
    ids = mx.array([[5, 9, 13, 2, 7, 11], [4, 8, 12, 1, 6, 10]])
    plain, per_row = [ArrayCache() for _ in model.layers], [ArrayCache(offset=mx.array([0, 0])) for _ in model.layers]
    model.encode(ids, plain)
    model.encode(ids, per_row)
    for a, b in zip(plain, per_row):
        assert mx.array_equal(a.keys, b.keys)


def test_rows_repacked_when_their_spans_drift_apart(tiny, monkeypatch):
    """Rows that commit more often run ahead in the shared buffer; past a buffer step of drift the cache is
    repacked (the spans right-aligned again). With a step of 4 slots (half a canvas here) that happens after
    a row commits alone, and every request still equals its lone run."""
    import mlx_diffusiongemma.batch_cache as batch_cache

    monkeypatch.setattr(batch_cache, "_STEP", 4)
    packs = []
    pack = batch_cache.BatchLayerCache._pack
    monkeypatch.setattr(batch_cache.BatchLayerCache, "_pack", lambda self, *a: packs.append(1) or pack(self, *a))
    name, model, tokenizer = tiny
    prompts = _prompts(3)
    seeds = [300 + i for i in range(len(prompts))]
    got, _ = _batched(model, tokenizer, prompts, seeds)
    for i, (prompt, s, m) in enumerate(zip(prompts, seeds, MAX_TOKENS)):
        assert got[i] == _alone(model, tokenizer, prompt, s, m), f"{name}, request {i}"
    joins = len(prompts) * len(model.layers)
    assert len(packs) > joins, "spans must have drifted apart and been repacked (beyond the joins' packs)"


def test_stopping_at_a_draft_preview_loses_no_commit(tiny):
    """A live view may stop reading a step at a draft preview (the pass's commits not yet handed out): the
    next step commits those rows first, and every request still ends with its lone run's tokens."""
    _, model, tokenizer = tiny
    prompts = _prompts(4)[:3]
    batch = BatchGenerator(model, tokenizer)
    requests = [batch.submit(p, seed=s, max_tokens=16, draft_preview=True) for s, p in enumerate(prompts)]
    tokens, ends, previews = {r: [] for r in requests}, {}, 0
    while not batch.idle:
        for request, response in batch.step():
            if response.draft is not None:
                previews += 1
                break  # the rest of this step, its commits included, is left unread
            tokens[request] += response.tokens
            ends[request] = response.finish_reason
    assert previews > 0 and sorted(ends) == requests
    for s, (request, prompt) in enumerate(zip(requests, prompts)):
        alone = list(stream_generate(model, tokenizer, prompt, seed=s, max_tokens=16))
        assert tokens[request] == [t for r in alone for t in r.tokens]
