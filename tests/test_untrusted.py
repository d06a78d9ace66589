"""Untrusted checkpoints: a config or index that would allocate, read outside the folder or crash is refused in
one line, before the model is built; a config transformers loads, we load.

Most cases start from a copy of the bundled toy model (4 layers, 5 MB), so no test allocates more than its
size; the two that would have allocated gigabytes run in a child process with a capped address space.
"""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import build_checkpoint, decoder_logits_pair, load_reference
from mlx_diffusiongemma import load
from mlx_diffusiongemma.generate import generate
from mlx_diffusiongemma.errors import ChatTemplateError, CheckpointError
from mlx_diffusiongemma.loader import load_model
from mlx_diffusiongemma.toy import TOY_PATH

# The two cases that allocated gigabytes run in a child whose address space is capped, once its imports are
# done, at what it holds plus this: the old behaviour fails there with a MemoryError instead of eating memory.
HEADROOM = 512 * 1024**2
_CAPPED = f"""
import resource, sys
import mlx.core, mlx_diffusiongemma.cli as cli, mlx_diffusiongemma.loader, mlx_diffusiongemma.model
try:  # Linux; elsewhere the run goes uncapped
    size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + {HEADROOM}, resource.RLIM_INFINITY))
except (OSError, ValueError):
    pass
sys.argv[0] = "mlx-diffusiongemma"
cli.main()
"""


def _cli(*args, capped: bool = False):
    command = [sys.executable, "-c", _CAPPED] if capped else [sys.executable, "-m", "mlx_diffusiongemma"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def _one_line(result, *words):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


def _toy(tmp_path: Path, name: str = "toy") -> Path:
    return Path(shutil.copytree(TOY_PATH, tmp_path / name))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _text(edit):
    def apply(config):
        edit(config["text_config"])
        return config

    return apply


# --- config.json ------------------------------------------------------------------------------------------


def test_a_million_layers_is_refused_before_the_model_is_built(tmp_path):
    path = _toy(tmp_path)
    _edit_json(path / "config.json", _text(lambda t: (t.update(num_hidden_layers=1_000_000), t.pop("layer_types"))))
    # Building that model first (today's main) exhausts the capped address space: a MemoryError traceback.
    _one_line(_cli("info", "--model", str(path), capped=True), "num_hidden_layers 1000000", "4 layers")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.update(vocab_size=10**9), "model.decoder.embed_tokens.weight"),  # shape check, not a 4 TB table
        (lambda t: t.update(num_hidden_layers=6), "layer_types"),
        (lambda t: t.update(layer_types=[]), "layer_types"),
        (lambda t: t.update(layer_types=["sliding_attention", "local", "sliding_attention", "full_attention"]),
         "'local'"),
        (lambda t: t.update(hidden_size=-96), "hidden_size"),
        (lambda t: t.update(hidden_size="96"), "hidden_size"),
        (lambda t: t.update(intermediate_size=True), "intermediate_size"),
        (lambda t: t.update(head_dim=2**40), "head_dim"),
        (lambda t: t.update(num_attention_heads=3), "multiple"),
        (lambda t: t.update(top_k_experts=9), "top_k_experts"),
        (lambda t: t.update(rope_parameters={"full_attention": {"rope_type": "yarn"}}),
         "rope_type 'yarn' is not supported"),
        (lambda t: t.update(rms_norm_eps="tiny"), "rms_norm_eps must be a positive number"),
        (lambda t: t.update(per_layer_config=[1]), "per_layer_config"),
    ],
)
def test_bad_config_values_are_named(tmp_path, edit, words):
    path = _toy(tmp_path)
    _edit_json(path / "config.json", _text(edit))
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(")):
        load(path)


@pytest.mark.parametrize("content, words", [("[1, 2]", "JSON object"), ('{"text_config": [1]}', "text_config")])
def test_config_of_the_wrong_type(tmp_path, content, words):
    path = _toy(tmp_path)
    (path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=words):
        load(path)


def test_same_geometry_full_layers_load_as_transformers_does(tmp_path):
    """transformers >= 5.23 writes `per_layer_config: {}` when full layers keep the sliding geometry; it then
    gives them `head_dim` and `num_key_value_heads`, and so must we (decoder logits agree)."""
    path = build_checkpoint(tmp_path / "same", num_layers=3, tokenizer=False, per_layer_config={},
                            global_head_dim=None, num_global_key_value_heads=None)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["global_head_dim"] = None  # the form the issue saw; absent is read the same way
    (path / "config.json").write_text(json.dumps(config))
    assert config["text_config"]["per_layer_config"] == {}
    ref, ours = load_reference(path), load_model(path)
    assert ours.args.geometry(2) == ours.args.geometry(0) == (8, 2)
    rng = np.random.default_rng(0)
    ids, canvas = rng.integers(0, 64, (1, 11)), rng.integers(0, 64, (1, 8))
    expected, got = decoder_logits_pair(ref, ours, ids, canvas)
    assert np.abs(expected - got).max() <= 1e-4


# --- weights: index and headers -----------------------------------------------------------------------------


def _index(path: Path, shard: str) -> None:
    keys = json.loads(_header(TOY_PATH / "model.safetensors"))
    weight_map = {k: shard for k in keys if k != "__metadata__"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _header(file: Path) -> bytes:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def test_index_naming_another_folders_weights_is_refused(tmp_path):
    other = _toy(tmp_path, "other")
    path = _toy(tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    _index(path, "../other/model.safetensors")  # today's main loads the other folder's weights
    with pytest.raises(CheckpointError, match="not a file name"):
        load(path)
    _index(path, str((other / "model.safetensors").absolute()))
    _one_line(_cli("info", "--model", str(path)), "not a file name", "outside the checkpoint folder")


def test_index_shard_that_is_a_symlink_out_of_the_folder_loads(tmp_path):
    """The Hugging Face cache keeps shards as symlinks to blobs elsewhere: a plain name that links out is fine."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    path = _toy(tmp_path)
    (path / "model.safetensors").rename(blobs / "0123abcd")
    (path / "model-00001-of-00001.safetensors").symlink_to(blobs / "0123abcd")
    _index(path, "model-00001-of-00001.safetensors")
    model, _ = load(path)
    assert model.args.num_hidden_layers == 4


@pytest.mark.parametrize("content, words", [("[]", "JSON object"), ('{"weight_map": [1]}', "weight_map")])
def test_index_of_the_wrong_type(tmp_path, content, words):
    path = _toy(tmp_path)
    (path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=words):
        load(path)


def test_a_3gb_header_is_refused_unread(tmp_path):
    path = _toy(tmp_path)
    shard = path / "model.safetensors"
    claimed = 3 * 10**9
    with open(shard, "wb") as f:  # a sparse file as long as its header claims: nothing is written to disk
        f.write(struct.pack("<Q", claimed))
        f.truncate(8 + claimed + 8)
    # Reading the header first (today's main) needs 3 GB: a MemoryError under the cap.
    _one_line(_cli("info", "--model", str(path), capped=True), "3,000,000,000-byte header")


def test_header_whose_bytes_do_not_match_its_shape(tmp_path):
    from safetensors.numpy import save_file

    path = _toy(tmp_path)
    save_file({"model.decoder.norm.weight": np.ones(96, np.float32)}, str(path / "extra.safetensors"))
    data = bytearray((path / "extra.safetensors").read_bytes())
    data[8:8 + len(_header(path / "extra.safetensors"))] = _header(path / "extra.safetensors").replace(b"[96]", b"[99]")
    (path / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="holds 384 bytes but its shape"):
        load(path)


def test_integer_weight_where_a_float_is_needed(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _toy(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.decoder.norm.weight"] = tensors["model.decoder.norm.weight"].astype(np.int32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.decoder.norm.weight .* is I32, not a float type"):
        load(path)


# --- tokenizer and chat template ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, words",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m.content ", "failed"),  # a syntax error
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # the jinja sandbox
        ("{{ messages[0].content / 0 }}", "failed"),
    ],
)
def test_failing_chat_template_is_one_line(tmp_path, template, words):
    path = _toy(tmp_path)
    _edit_json(path / "tokenizer_config.json", lambda c: {**c, "chat_template": template})
    model, tokenizer = load(path)
    with pytest.raises(ChatTemplateError, match=words):
        generate(model, tokenizer, "Hello", max_tokens=4, seed=0)


def test_chat_template_errors_on_the_command_line_and_in_chat(tmp_path):
    path = _toy(tmp_path)
    _edit_json(path / "tokenizer_config.json", lambda c: {**c, "chat_template": "{{ raise_exception('no') }}"})
    _one_line(_cli("generate", "--model", str(path), "--prompt", "hi", "--no-live"), "chat template", "(no)")
    chat = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma", "chat", "--model", str(path), "--no-live"],
        input="hello\nagain\n", capture_output=True, text=True, timeout=300,
    )
    assert chat.returncode == 0 and "Traceback" not in chat.stderr
    assert chat.stderr.count("chat template") == 2  # one line per message; the session went on


def test_missing_tokenizer_config_then_generate(tmp_path):
    path = _toy(tmp_path)
    (path / "tokenizer_config.json").unlink()
    _one_line(_cli("generate", "--model", str(path), "--prompt", "hi", "--no-live"), "no chat template",
              "--ignore-chat-template")
    model, tokenizer = load(path)
    assert generate(model, tokenizer, "hi", chat_template=False, max_tokens=4, seed=0) is not None
