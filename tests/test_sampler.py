"""Pure sampler maths on hand-made logits/entropies, plus exact agreement with transformers' reference pieces."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import sampler as S


def np_entropy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    log_p = x - x.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(-1)


def accepted(ent, bound) -> np.ndarray:
    return np.array(S.entropy_bound_accept(mx.array(np.asarray(ent, dtype=np.float32)), bound))


# --- temperature schedule -------------------------------------------------------------------------------


def test_schedule_endpoints():
    n = 48
    temps = [S.temperature(s, n, 0.4, 0.8) for s in range(n, 0, -1)]
    assert temps[0] == pytest.approx(0.8, abs=1e-7)
    assert temps[-1] == pytest.approx(0.4 + 0.4 / n, abs=1e-7)
    assert min(temps) > 0.4
    assert all(a > b for a, b in zip(temps, temps[1:]))
    assert S.temperature(1, 1, 0.4, 0.8) == pytest.approx(0.8, abs=1e-7)


def test_schedule_matches_reference_float32_rounding():
    torch = pytest.importorskip("torch")
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    for t_min, t_max, n in [(0.4, 0.8, 48), (0.1, 1.3, 37), (0.0, 0.7, 16)]:
        proc = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=n)
        scores = torch.ones(1)
        for step in range(n, 0, -1):
            # The reference passes cur_step as an int32 tensor, so the schedule is computed in float32.
            out = proc(None, scores, cur_step=torch.tensor(step, dtype=torch.int32))
            ours = (scores / np.float32(S.temperature(step, n, t_min, t_max))).numpy()
            assert np.array_equal(out.numpy(), ours), (t_min, t_max, n, step)


# --- entropy ---------------------------------------------------------------------------------------------


def test_entropy_against_float64():
    v = 50
    rows = [
        np.zeros(v),  # uniform: log V
        np.r_[40.0, np.zeros(v - 1)],  # one-hot-ish
        np.r_[1e4, 1e4 - 1.0, np.full(v - 2, -1e4)],  # huge logits: two-way split
        np.linspace(-3, 3, v),
        np.full(v, 1e6),  # huge and uniform
    ]
    x = np.stack(rows)[None].astype(np.float32)  # [1, 5, V]
    ent = np.array(S.entropy(mx.array(x)))
    assert ent.shape == (1, 5) and ent.dtype == np.float32
    np.testing.assert_allclose(ent, np_entropy(x), rtol=1e-5, atol=1e-6)
    assert ent[0, 0] == pytest.approx(np.log(v), rel=1e-6)
    assert ent[0, 4] == pytest.approx(np.log(v), rel=1e-6)
    assert 0.0 <= ent[0, 1] < 1e-10


def test_entropy_random_and_bf16_input():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 7, 300)) * 4).astype(np.float32)
    np.testing.assert_allclose(np.array(S.entropy(mx.array(x))), np_entropy(x), rtol=1e-5, atol=1e-6)
    xb = mx.array(x).astype(mx.bfloat16)
    ent = S.entropy(xb)
    assert ent.dtype == mx.float32
    np.testing.assert_allclose(np.array(ent), np_entropy(np.array(xb.astype(mx.float32))), rtol=1e-5, atol=1e-6)


def test_distribution_of_softcapped_logits():
    """The loop's one pass over the model's softcapped logits: temperature, argmax (first of ties),
    probabilities, entropy, top prob."""
    from mlx_diffusiongemma.model import softcap

    x = np.array([[[0.0, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0], [80.0, 79.0, -3.0, 1.0]]], dtype=np.float32)
    temp = S.temperature(3, 4, 0.4, 0.8)
    scaled, weights, total, ent, best = S.distribution(softcap(mx.array(x)), temp)
    expected = 30.0 * np.tanh(x / 30.0) / np.float32(temp)
    np.testing.assert_allclose(np.array(scaled), expected, rtol=1e-6)
    assert best.dtype == mx.int32
    assert best.tolist() == [[1, 0, 0]]  # first index among equal maxima, like torch.argmax
    p = np.exp(expected - expected.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(weights / total[..., None]), p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(1.0 / total), p.max(-1), rtol=1e-6)
    np.testing.assert_allclose(np.array(ent), np_entropy(expected), rtol=1e-5, atol=1e-6)


# --- entropy-bound acceptance ----------------------------------------------------------------------------


def test_entropy_bound_basic():
    # sorted: 0.01 (pos 1), 0.05 (pos 2), 0.2 (pos 3), 0.3 (pos 0); sums before: 0, 0.01, 0.06, 0.26
    assert accepted([[0.3, 0.01, 0.05, 0.2]], 0.1).tolist() == [[False, True, True, True]]


def test_entropy_bound_never_reached_only_rank_one():
    assert accepted([[3.0, 1.0, 2.0]], 0.5).tolist() == [[False, True, False]]
    assert accepted([[3.0, 1.0, 2.0], [9.0, 8.0, 7.5]], 1e-6).sum(-1).tolist() == [1, 1]


def test_entropy_bound_huge_accepts_all():
    assert accepted([[3.0, 1.0, 2.0, 11.0]], 1e9).all()


def test_entropy_bound_single_position():
    assert accepted([[123.0]], 1e-9).tolist() == [[True]]
    assert accepted([[0.0], [5.0]], 0.1).tolist() == [[True], [True]]


def test_entropy_bound_all_equal():
    ent = np.full((2, 6), 1.0)
    assert accepted(ent, 0.1).tolist() == [[True] + [False] * 5] * 2  # ties: the lowest position wins
    assert accepted(ent, 2.5).tolist() == [[True] * 3 + [False] * 3] * 2  # sums before: 0, 1, 2 <= 2.5
    assert accepted(ent, 2.0).sum() == 6  # boundary is inclusive (<=)


def test_entropy_bound_ties_straddling_the_bound():
    # sorted 0.25, 0.5, 0.5, 0.5 -> sums before 0, 0.25, 0.75, 1.25: three accepted, two of the three 0.5s
    mask = accepted([[0.5, 0.25, 0.5, 0.5]], 0.75)
    assert mask.tolist() == [[True, True, True, False]]


def _reference_mask(logits: np.ndarray, bound: float, entropies: np.ndarray | None = None) -> np.ndarray:
    """transformers' EntropyBoundSampler mask; `entropies` replaces its Categorical entropy when given."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
    )

    b, c = logits.shape[:2]
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)), c, 10, 1)
    canvas = torch.zeros(b, c, dtype=torch.long)
    categorical = torch.distributions.Categorical
    if entropies is not None:
        ent_t = torch.from_numpy(entropies)
        torch.distributions.Categorical = lambda logits: SimpleNamespace(entropy=lambda: ent_t)
    try:
        sampler.accept_canvas(canvas, canvas + 1, torch.from_numpy(logits), 1)
    finally:
        torch.distributions.Categorical = categorical
    return sampler.accepted_token_mask.numpy()


def test_entropy_and_acceptance_match_transformers_on_random_logits():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for scale in (0.3, 1.0, 3.0, 10.0):
        x = (rng.standard_normal((3, 64, 97)) * scale).astype(np.float32)
        ours = S.entropy(mx.array(x))
        ref = torch.distributions.Categorical(logits=torch.from_numpy(x)).entropy().numpy()
        np.testing.assert_allclose(np.array(ours), ref, rtol=2e-6, atol=2e-6)
        for bound in (0.05, 0.1, 0.5, 2.0, 10.0, 100.0):
            expect = _reference_mask(x, bound)
            assert np.array_equal(np.array(S.entropy_bound_accept(ours, bound)), expect), (scale, bound)
            # and bit-for-bit on the reference's own entropies
            assert np.array_equal(np.array(S.entropy_bound_accept(mx.array(ref), bound)), expect)


def test_ties_same_count_and_values_as_transformers():
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    # multiples of 1/8 are exact in float32, so the sorted sums agree exactly; only tie order may differ
    ent = (rng.integers(0, 4, size=(4, 256)) / 8.0).astype(np.float32)
    for bound in (0.0625, 0.125, 1.0, 3.0, 10.0):
        ours = np.array(S.entropy_bound_accept(mx.array(ent), bound))
        ref = _reference_mask(np.zeros((*ent.shape, 1), np.float32), bound, ent)
        assert np.array_equal(ours.sum(-1), ref.sum(-1))
        for row in range(ent.shape[0]):
            assert sorted(ent[row][ours[row]]) == sorted(ent[row][ref[row]])


# --- confidence acceptance, re-noise ---------------------------------------------------------------------


def test_confidence_accept():
    top = mx.array([[0.95, 0.2, 0.9, 0.89], [0.3, 0.5, 0.1, 0.2], [0.9, 0.9, 0.9, 0.9]])
    mask = np.array(S.confidence_accept(top, 0.9))
    assert mask[0].tolist() == [True, False, True, False]
    assert mask[1].tolist() == [False, True, False, False]  # none reached: only the most confident one
    assert mask[2].all()  # threshold is inclusive
    never = np.array(S.confidence_accept(top, 0.99))
    assert never.sum(-1).tolist() == [1, 1, 1]
    assert never[2].tolist() == [True, False, False, False]


def test_renoise():
    canvas = mx.array([[5, 6, 7], [8, 9, 10]])
    noise = mx.array([[0, 1, 2], [3, 4, 5]])
    acc = mx.array([[True, False, True], [False, False, False]])
    assert S.renoise(canvas, acc, noise).tolist() == [[5, 1, 7], [3, 4, 5]]


# --- adaptive stop ---------------------------------------------------------------------------------------


def test_stability_empty_history_never_stable():
    a = mx.array([[1, 2, 3], [4, 5, 6]])
    stable, hist = S.is_stable(a, (), 1)
    assert stable.tolist() == [False, False]
    assert len(hist) == 1
    stable, hist = S.is_stable(a, hist, 1)
    assert stable.tolist() == [True, True]
    stable, _ = S.is_stable(mx.array([[1, 2, 3], [4, 5, 0]]), hist, 1)
    assert stable.tolist() == [True, False]


def test_stability_threshold_zero_always_stable():
    stable, hist = S.is_stable(mx.array([[1, 2]]), (), 0)
    assert stable.tolist() == [True] and hist == ()


def test_stability_threshold_two():
    a, b = mx.array([[1, 2]]), mx.array([[1, 3]])
    hist = ()
    seen = []
    for canvas in (a, a, a, b, a, a, a):
        stable, hist = S.is_stable(canvas, hist, 2)
        seen.append(stable.item())
        assert len(hist) <= 2
    # third identical canvas in a row is the first that matches both remembered ones
    assert seen == [False, False, True, False, False, False, True]


def test_confidence_is_strict():
    ent = mx.array([[0.25, 0.75], [0.0, 0.0]])
    assert S.is_confident(ent, 0.5).tolist() == [False, True]
    assert S.is_confident(ent, 0.5000001).tolist() == [True, True]


def test_stop_test_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        StableAndConfidentStoppingCriteria,
    )

    rng = np.random.default_rng(3)
    c, v = 5, 6
    # peaked logits (entropy ~ 0) on some steps, flat ones on others; argmax canvases repeat in runs
    canvases = [rng.integers(0, v, size=(2, c)) for _ in range(3)]
    schedule = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    for threshold in (0, 1, 2, 3):
        ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.005)
        hist = ()
        for step, k in enumerate(schedule):
            argmax = canvases[k]
            logits = np.where(np.eye(v)[argmax] > 0, 60.0, 0.0).astype(np.float32)
            if step == 6:
                logits[1] = 0.0  # row 1 not confident
            expect = ref(torch.from_numpy(argmax), torch.from_numpy(logits)).numpy()
            stop, hist = S.stop_test(mx.array(argmax), hist, S.entropy(mx.array(logits)), threshold, 0.005)
            assert np.array_equal(np.array(stop), expect), (threshold, step)


# --- EOS finalisation ------------------------------------------------------------------------------------


def test_finalize_eos_cases():
    canvas = mx.array(
        [
            [1, 5, 6, 7],  # EOS first
            [5, 106, 6, 1],  # EOS mid-canvas, then another EOS id
            [5, 6, 7, 50],  # EOS last
            [5, 6, 7, 8],  # none
        ]
    )
    out, has_eos = S.finalize_eos(canvas, [1, 106, 50], 0)
    assert out.tolist() == [[1, 0, 0, 0], [5, 106, 0, 0], [5, 6, 7, 50], [5, 6, 7, 8]]
    assert has_eos.tolist() == [True, True, True, False]


def test_finalize_eos_done_rows_no_pad_and_no_eos():
    canvas = mx.array([[5, 1, 6], [5, 6, 7]])
    out, has_eos = S.finalize_eos(canvas, [1], 0, done=mx.array([False, True]))
    assert out.tolist() == [[5, 1, 0], [0, 0, 0]]
    assert has_eos.tolist() == [True, False]
    out, has_eos = S.finalize_eos(canvas, [1], None)
    assert out.tolist() == canvas.tolist() and has_eos.tolist() == [True, False]
    out, has_eos = S.finalize_eos(canvas, [], 0)
    assert out.tolist() == canvas.tolist() and not has_eos.any().item()


def test_finalize_eos_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation import EosTokenCriteria, StoppingCriteriaList
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationMixin

    rng = np.random.default_rng(4)
    eos = [1, 106, 50]
    cfg = SimpleNamespace(pad_token_id=0, eos_token_id=eos)
    for _ in range(20):
        prompt = rng.integers(200, 300, size=(5, 3))
        canvas = rng.choice([1, 50, 106, 7, 8, 9, 10, 11, 12, 13], size=(5, 8))
        done = rng.random(5) < 0.3
        ids = torch.from_numpy(np.concatenate([prompt, canvas], axis=1))
        ref_ids, ref_fin = DiffusionGemmaGenerationMixin._finalize_canvas(
            ids, torch.from_numpy(done), cfg, StoppingCriteriaList([EosTokenCriteria(eos)]), 8, torch.tensor(eos)
        )
        out, has_eos = S.finalize_eos(mx.array(canvas), eos, 0, done=mx.array(done))
        assert np.array_equal(np.array(out), ref_ids[:, -8:].numpy())
        assert np.array_equal(np.array(has_eos) | done, ref_fin.numpy())


# --- the host (NumPy) vocabulary pass used on MLX's CPU backend -----------------------------------------


def _capped(x: np.ndarray) -> np.ndarray:
    from mlx_diffusiongemma.model import softcap

    return np.array(softcap(mx.array(x)))


def _mlx_stats(x: np.ndarray, temp: float, dtype=mx.float32):
    return [np.array(a) for a in S.vocab_stats(mx.array(x), temp, dtype)]


def test_host_softcap_matches_the_model_and_writes_in_place():
    from mlx_diffusiongemma import host

    x = (np.random.default_rng(2).standard_normal((2, 9, 301)) * 60).astype(np.float32)
    logits = mx.array(x)
    got = host.softcap(logits)
    assert got is logits  # written into the logits' own buffer
    np.testing.assert_allclose(np.array(got), _capped(x), rtol=2e-7, atol=2e-6)


def test_host_vocab_stats_match_mlx_and_consume_the_logits():
    from mlx_diffusiongemma import host

    rng = np.random.default_rng(3)
    for scale in (0.5, 5.0, 60.0):
        x = _capped((rng.standard_normal((2, 9, 301)) * scale).astype(np.float32))
        temp = S.temperature(5, 8, 0.4, 0.8)
        want = _mlx_stats(x, temp)
        raw = mx.array(x)
        got = host.vocab_stats(raw, temp, mx.float32)
        ent, total, best, probs, sc = [np.array(a) for a in got]
        assert got[3] is raw and got[4] is raw  # probabilities written into the logits' own buffer
        assert best.dtype == np.int32 and np.array_equal(best, want[2])
        np.testing.assert_allclose(ent, want[0], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(total, want[1], rtol=1e-5)
        np.testing.assert_allclose(probs, want[3], rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert np.array_equal(np.array(host.argmax(mx.array(x), temp)), best)


def test_host_argmax_first_of_ties_after_softcap():
    from mlx_diffusiongemma import host

    # 30 * tanh(x / 30) saturates to exactly 30 in float32 for x >~ 270: the three maxima tie after the
    # softcap, and the reference's argmax (of the processed logits) takes the first, not the largest raw.
    x = np.array([[[5.0, 400.0, 500.0, 600.0, -2.0], [1.0, 3.0, 2.0, 3.0, 0.0]]], dtype=np.float32)
    assert np.array(host.argmax(host.softcap(mx.array(x)), 0.5)).tolist() == [[1, 1]]
    assert np.array(host.vocab_stats(host.softcap(mx.array(x)), 0.5, mx.float32)[2]).tolist() == [[1, 1]]
    assert _mlx_stats(_capped(x), 0.5)[2].tolist() == [[1, 1]]


def test_host_bf16_rounding_and_self_conditioning():
    from mlx_diffusiongemma import host

    rng = np.random.default_rng(4)
    x = (rng.standard_normal(4096) * 30).astype(np.float32)
    # Exact halfway cases (ties to even both ways) and values that round up across a power of two.
    halfway = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 - 2**-9, 255.5], dtype=np.float32)
    for v in (x, halfway):
        want = np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32))
        assert np.array_equal(host._round_bf16(v.copy()), want)
    logits = (rng.standard_normal((1, 6, 211)) * 8).astype(np.float32)
    want = _mlx_stats(logits, 0.6, mx.bfloat16)
    got = [np.array(a) for a in host.vocab_stats(mx.array(logits), 0.6, mx.bfloat16)]
    np.testing.assert_allclose(got[4], want[4], rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(got[3], want[3], rtol=2e-5, atol=1e-9)


def test_host_vocab_stats_do_not_depend_on_blocks_or_threads(monkeypatch):
    from mlx_diffusiongemma import host

    x = (np.random.default_rng(5).standard_normal((1, 37, 500)) * 6).astype(np.float32)
    runs = []
    for workers, block in ((1, 1 << 17), (2, 1000), (3, 2000), (2, 500)):
        monkeypatch.setattr(host, "_workers", lambda w=workers: w)
        monkeypatch.setattr(host, "_BLOCK", block)
        runs.append([np.array(a) for a in host.vocab_stats(mx.array(x), 0.7, mx.float32)])
        runs.append([np.array(host.argmax(mx.array(x), 0.7))])
    for other in runs[2::2]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other))
    for other in runs[3::2]:
        assert np.array_equal(runs[1][0], other[0])
