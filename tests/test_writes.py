"""Interrupted, killed, concurrent and failing writes of `convert`, `fuse`, `finetune` and adapters: whatever
happens, nothing partial or stale is left beside the target, and a second writer never silently replaces the
first. Every run converts or fuses the bundled toy model (5 MB), so these take seconds."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_diffusiongemma.convert import convert
from mlx_diffusiongemma.errors import CheckpointError, UsageError
from mlx_diffusiongemma.folders import target_lock
from mlx_diffusiongemma.loader import load
from mlx_diffusiongemma.lora import apply_lora, save_adapters
from mlx_diffusiongemma.train import read_jsonl, run_finetune, train
from mlx_diffusiongemma.train.command import _tokenized

ROOT = Path(__file__).resolve().parents[1]
# The converter's test hooks: a pause after each of the toy's 112 tensors, and small shards.
SLOW = {"MLX_DIFFUSIONGEMMA_CONVERT_DELAY": "0.1", "MLX_DIFFUSIONGEMMA_CONVERT_SHARD_BYTES": "100000"}


def _popen(*args, env=None, **kw) -> subprocess.Popen:
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kw)


def _run(*args, **kw) -> subprocess.CompletedProcess:
    proc = _popen(*args, **kw)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _convert(out: Path, *flags, env=None) -> subprocess.Popen:
    return _popen("convert", "--hf-path", "toy", "--mlx-path", out, *flags, env=env)


def _wait_for_first_shard(proc: subprocess.Popen, parent: Path) -> Path:
    """The temporary folder of a running conversion, once it holds its first output shard."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = [p for p in parent.iterdir() if ".tmp-" in p.name]
        if tmp and any(tmp[0].glob("*.safetensors")):
            return tmp[0]
        time.sleep(0.01)
    raise AssertionError(f"the conversion never got to its first shard: {proc.communicate()}")


def _one_line_error(result, *words):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# --- interrupted and killed runs --------------------------------------------------------------------------


def test_sigterm_mid_convert_leaves_nothing(tmp_path):
    proc = _convert(tmp_path / "out", env=SLOW)
    _wait_for_first_shard(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no lock file


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, capfd):
    proc = _convert(tmp_path / "out", env=SLOW)
    tmp = _wait_for_first_shard(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    assert tmp.exists() and str(proc.pid) in tmp.name  # the dead writer's pid is in the name
    convert("toy", tmp_path / "out")
    assert f"removed {tmp}" in capfd.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert load(tmp_path / "out")[0].args.vocab_size > 0


def test_live_writers_temporary_folder_is_kept(tmp_path):
    """Only a dead process's leftovers are removed: one whose pid is alive is named and left alone."""
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        kept = tmp_path / f".out.tmp-{live.pid}-0123abcd"
        stale = tmp_path / f".out.tmp-{dead.pid}-4567cdef"
        other = tmp_path / f".other.tmp-{dead.pid}-89abcdef"  # another target's: not ours to remove
        for folder in (kept, stale, other):
            folder.mkdir()
        convert("toy", tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, other.name, "out"])
    finally:
        live.kill()
        live.wait()


# --- concurrent runs ---------------------------------------------------------------------------------------


def test_second_concurrent_convert_refuses(tmp_path):
    """Two real runs to one new path: the first is frozen (SIGSTOP) mid-write, holding the target's lock, so
    the second certainly runs while it is in progress."""
    first = _convert(tmp_path / "out", env=SLOW)
    try:
        _wait_for_first_shard(first, tmp_path)
        first.send_signal(signal.SIGSTOP)
        with pytest.raises(CheckpointError, match=f"pid {first.pid} is writing {tmp_path / 'out'} right now"):
            convert("toy", tmp_path / "out")  # the second run
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_waits_for_the_running_writer(tmp_path):
    out = tmp_path / "out"
    with target_lock(out):  # held as a running conversion holds it
        proc = _convert(out, "--force")
        line = proc.stderr.readline()  # printed before it blocks on the lock
        assert line.startswith(f"waiting for pid {os.getpid()}, which is writing {out}"), line
        time.sleep(0.5)
        assert proc.poll() is None and not out.exists()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- what the output looks like ----------------------------------------------------------------------------


def test_output_folder_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = convert("toy", tmp_path / "out")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755


def _toy_adapters(path: Path) -> None:
    model, _ = load("toy")
    mx.random.seed(0)
    config = apply_lora(model, rank=2)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.01)
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    save_adapters(model, path, config)


def _file_size_limit(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_fuse_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    _toy_adapters(tmp_path / "ad")
    parent = tmp_path / "outputs"
    parent.mkdir()
    proc = _popen("fuse", "--model", "toy", "--adapter-path", tmp_path / "ad", "--save-path", parent / "fused",
                  preexec_fn=_file_size_limit(1_000_000))  # the fused toy model is 5 MB
    _, err = proc.communicate(timeout=300)
    _one_line_error(subprocess.CompletedProcess([], proc.returncode, "", err), "writing", "nothing was written")
    assert list(parent.iterdir()) == []


def test_stale_partial_adapter_files_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "ad"
    folder.mkdir()
    stale = folder / f".adapters.safetensors.partial-{dead.pid}.safetensors"
    stale.write_bytes(b"half a file")
    _toy_adapters(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


# --- finetune: outputs checked first, a non-finite loss saves nothing --------------------------------------


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sort {n}", "completion": "".join(sorted(str(n)))}) + "\n"
                            for n in (312, 9471, 58)))
    return path


@pytest.mark.parametrize("option", ["adapter_path", "save_path"])
def test_finetune_checks_its_output_before_training(option, data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    kwargs = {option: str(blocker / "out"), "full": option == "save_path"}
    with pytest.raises(UsageError, match=f"cannot be written: {blocker} is a file"):
        run_finetune("toy", str(data), iters=1, **kwargs)  # until now: after training, as a NotADirectoryError


def test_finetune_nan_learning_rate_saves_nothing(data, tmp_path):
    with pytest.raises(UsageError, match="--learning-rate must be a positive number"):
        run_finetune("toy", str(data), iters=2, learning_rate=float("nan"), adapter_path=str(tmp_path / "ad"))
    assert not (tmp_path / "ad").exists()


def test_sigterm_during_full_finetune_saves_leaves_only_a_complete_checkpoint(data, tmp_path):
    """SIGTERM while `finetune --full` saves every iteration: the last complete save stays, and neither a
    temporary folder nor the --save-path lock is left."""
    parent = tmp_path / "outputs"
    proc = _popen("finetune", "--model", "toy", "--data", data, "--full", "--save-path", parent / "ft",
                  "--iters", 100000, "--save-every", 1, "--steps-per-report", 1000)
    for line in proc.stderr:
        if "saved to" in line:  # the first save is in place; later ones go on back to back
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert [p.name for p in parent.iterdir()] == ["ft"]
    assert load(parent / "ft")[0].args.vocab_size > 0


def test_training_stops_at_a_non_finite_loss(data):
    model, tokenizer = load("toy")  # every weight trains, as with --full
    examples = _tokenized(tokenizer, read_jsonl(data), data, model.args)
    saves = []
    with pytest.raises(UsageError, match="training stopped at iteration 2: the loss is (nan|inf)"):
        train(model, examples, iters=5, learning_rate=1e30, save_every=1, save=saves.append, log=lambda _: None)
    assert saves == [1]  # the finite state of iteration 1 only; nothing after the loss broke
    model, _ = load("toy")  # a finite loss whose update overflows (float32 lr = inf): not saved either
    with pytest.raises(UsageError, match="iteration 1: the weights became NaN or infinite"):
        train(model, examples, iters=1, learning_rate=1e39, save_every=1, save=saves.append, log=lambda _: None)

