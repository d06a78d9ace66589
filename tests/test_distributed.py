"""Two local processes (MLX's ring backend over loopback, as `mlx.launch -n 2 --backend ring` runs them) against
one: the model split across them gives one process's logits to fp32 rounding and its tokens exactly, while each
rank loads and holds about half of the weights; a failure on one rank ends both with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import build_checkpoint
from figures import record
from distributed_worker import PRESETS, figures, sampler_case, sampler_figures
from mlx_diffusiongemma.checkpoint import TOY_PATH
from mlx_diffusiongemma.loader import load_model, save_checkpoint, read_json

HERE = Path(__file__).resolve().parent
TIMEOUT = 150


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(tmp_path: Path, argv: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run `argv[r]` as rank r of a 2-process ring group on loopback; (status, stdout, stderr) per rank. Both are
    killed when either outlives the timeout (a rank left waiting in a collective never returns by itself)."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(len(argv))]))
    procs = [subprocess.Popen(cmd, env={**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
             for rank, cmd in enumerate(argv)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _quantized(source: Path, dest: Path) -> Path:
    """`source` with every module whose input width allows it quantized to 8 bits in groups of 32 (attention's
    o_proj then splits in some layers and not others)."""
    import mlx.nn as nn

    model = load_model(source)
    nn.quantize(model, group_size=32, bits=8,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    config = read_json(source / "config.json")
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    return save_checkpoint(model, source, dest, config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """A 3-layer fp32 checkpoint with an odd vocabulary (uneven split) and KV-head counts 2 and 1, its 8-bit
    quantization, a bf16 one, and the toy."""
    root = tmp_path_factory.mktemp("dist")
    odd = build_checkpoint(root / "odd", layout="hub", seed=12, num_layers=3, sliding_window=6, embed_std=0.2,
                           tokenizer=False, vocab_size=257, canvas_length=8)
    bf16 = build_checkpoint(root / "bf16", seed=4, num_layers=3, sliding_window=6, embed_std=0.2, tokenizer=False,
                            dtype="bfloat16", canvas_length=8)
    return [odd, _quantized(odd, root / "q8"), bf16, TOY_PATH]


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("ranks")
    cmd = [sys.executable, str(HERE / "distributed_worker.py"), str(tmp / "out.npz"), *map(str, checkpoints)]
    runs = launch(tmp, [cmd, cmd])
    assert all(code == 0 for code, _, _ in runs), "\n".join(err for _, _, err in runs)
    return dict(np.load(tmp / "out.npz"))


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))


def test_the_vocabulary_passes_reduced_across_ranks_equal_one_process(two_ranks):
    from mlx_diffusiongemma import sampler

    one = sampler_figures(sampler.vocab_stats, sampler.scaled_argmax, sampler.inverse_cdf_sample)
    V = sampler_case()[0].shape[-1]
    # Ties go to the lowest id, across slices (row 0: ids 2 and V - 2) as within one (row 2), as mx.argmax.
    assert two_ranks["sampler/argmax"].tolist() == one["sampler/argmax"].tolist() == [[2, V - 1, V - 3, V - 1]]
    assert two_ranks["sampler/argmax_only"].tolist() == one["sampler/argmax_only"].tolist()
    assert two_ranks["sampler/draw"].tolist() == one["sampler/draw"].tolist()
    for name in ("entropy", "total", "probs", "sc"):
        np.testing.assert_allclose(two_ranks[f"sampler/{name}"], one[f"sampler/{name}"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", range(4), ids=["odd vocab fp32", "8-bit", "bf16", "toy"])
def test_two_processes_give_one_process_logits_and_tokens(which, checkpoints, two_ranks):
    path = checkpoints[which]
    one = figures(load_model(path), path.name)
    for kind in ("logits", "logits_sc"):
        got, want = two_ranks[f"{path.name}/{kind}"], one[f"{path.name}/{kind}"]
        assert got.shape == want.shape
        if which == 2:
            # bf16: each rank's partial sum rounds once more, and a one-ulp difference in a layer's input can
            # flip the router's top-k choice, so agreement is to bf16 precision only (a wrong shard gives ~1).
            assert _rel_rms(got, want) < 0.1, kind
        else:
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), kind
        record(f"2 ranks vs 1, {path.name} {kind}: max |diff| / max |logit|",
               f"{np.abs(got - want).max() / np.abs(want).max():.2e}")
    if which != 2:
        for preset in (*PRESETS, "numpy_noise"):
            assert two_ranks[f"{path.name}/{preset}"].tolist() == one[f"{path.name}/{preset}"].tolist(), preset
    # Each rank read and holds about half the weights (norms, router and unsplittable modules stay whole).
    for key in ("bytes", "bytes_rank1"):
        share = two_ranks[f"{path.name}/{key}"] / one[f"{path.name}/bytes"]
        assert 0.3 < share < 0.65, key
        record(f"2 ranks, {path.name}: weights held by rank {key == 'bytes_rank1':d} / one process", f"{share:.3f}")


CLI = [sys.executable, "-m", "mlx_diffusiongemma", "generate", "-p", "sort 3 1 2", "--seed", "1", "--max-tokens", "48"]


def test_generate_on_two_ranks_prints_one_process_text_once(tmp_path):
    from mlx_diffusiongemma import generate, load

    (code0, out0, err0), (code1, out1, err1) = launch(tmp_path, [CLI + ["-m", "toy"]] * 2)
    assert (code0, code1) == (0, 0), err0 + err1
    model, tokenizer = load("toy")
    assert out0 == generate(model, tokenizer, "sort 3 1 2", seed=1, max_tokens=48) + "\n"
    assert "Processes: 2" in err0 and out1 == "" and "Processes" not in err1  # rank 0 alone prints


def test_a_failure_on_one_rank_ends_both_with_one_line(tmp_path):
    missing = tmp_path / "not-here"
    (code0, out0, err0), (code1, out1, err1) = launch(tmp_path, [CLI + ["-m", "toy"], CLI + ["-m", str(missing)]])
    assert (code0, code1) == (1, 1)
    lines = [line for line in (err0 + err1).splitlines() if not line.startswith("[ring]")]
    assert lines == [f"error: rank 1: no such folder: {missing} (pass a checkpoint folder or a Hub repo id like "
                     "org/name)"], err0 + err1
    assert out0 == out1 == ""


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["chat"]])
def test_commands_that_do_not_run_split_say_so_once(command, tmp_path):
    argv = [sys.executable, "-m", "mlx_diffusiongemma", *command, "-m", "toy"]
    (code0, out0, err0), (code1, out1, err1) = launch(tmp_path, [argv, argv])
    assert (code0, code1) == (1, 1)
    lines = [line for line in (err0 + err1).splitlines() if not line.startswith("[ring]")]
    assert lines == [f"error: {command[0]} does not run split across processes yet; start it without mlx.launch "
                     "(one process, holding the whole model)"], err0 + err1
