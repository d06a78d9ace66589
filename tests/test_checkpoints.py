"""Sanity tests of the tiny checkpoint builder (tests/checkpoints.py) against transformers and mlx-lm."""

import json
from pathlib import Path

import pytest
import torch
from checkpoints import (
    RELEASED_GENERATION_CONFIG,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    build_checkpoint,
)
from safetensors import safe_open

ROUNDTRIP_TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is about 3.14159.",
    "  leading spaces, two  inner spaces,\ttabs\nand new lines\n",
    "def add(a, b): return a + b  # {braces} [lists] (x) @ $ % ^ & * ~ ` | \\ < > ?",
    "unseen words: zyzzyva quixotic 0123456789",
]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _text_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["text_config"]


# --- config layouts and weights -------------------------------------------------------------------------


def test_per_layer_layout_is_what_transformers_writes(tiny_ckpt):
    text = _text_config(tiny_ckpt)
    assert text["per_layer_config"] == {"5": {"head_dim": 16, "num_key_value_heads": 1}}
    assert "global_head_dim" not in text and "num_global_key_value_heads" not in text
    assert text["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert text["sliding_window"] == 8
    assert text["vocab_size"] == TOKENIZER_VOCAB_SIZE


def test_hub_layout_matches_the_release_form(tiny_ckpt_hub):
    config = json.loads((tiny_ckpt_hub / "config.json").read_text())
    text = config["text_config"]
    assert "per_layer_config" not in text
    assert (text["global_head_dim"], text["num_global_key_value_heads"]) == (16, 1)
    assert (text["head_dim"], text["num_key_value_heads"]) == (8, 2)
    assert text["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert text["sliding_window"] == 6
    assert config["eos_token_id"] == [1, 106]


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_hub"])
def test_layouts_load_in_transformers_with_per_layer_geometry(fixture, request, load_reference):
    path = request.getfixturevalue(fixture)
    model = load_reference(path)
    text = model.config.text_config
    assert text._attn_implementation == "eager"
    assert model.config.canvas_length == 8
    for layer, layer_type in zip(model.model.decoder.layers, text.layer_types, strict=True):
        head_dim, kv_heads = (16, 1) if layer_type == "full_attention" else (8, 2)
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (4 * head_dim, 32)
        assert attn.k_proj.weight.shape == (kv_heads * head_dim, 32)
        assert attn.q_norm.weight.shape == (head_dim,)
    # The weights came from the file, not from a fresh init.
    saved = _tensors(path)
    torch.testing.assert_close(model.model.decoder.embed_tokens.weight, saved["model.decoder.embed_tokens.weight"])


def test_saved_keys_follow_the_release_ties(tiny_ckpt):
    keys = set(_tensors(tiny_ckpt))
    assert "lm_head.weight" not in keys
    encoder_text = {k for k in keys if k.startswith("model.encoder.language_model.")}
    assert encoder_text == {f"model.encoder.language_model.layers.{i}.layer_scalar" for i in range(6)}
    assert all(k.startswith(("model.decoder.", "model.encoder.")) for k in keys)
    # K = V on full layers: no v_proj there.
    assert "model.decoder.layers.4.self_attn.v_proj.weight" in keys
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in keys


def test_scales_are_randomised_and_layer_scalars_copied(tiny_ckpt):
    tensors = _tensors(tiny_ckpt)
    scalar_suffixes = ("router.scale", "per_expert_scale", "layer_scalar")
    scale_keys = [
        k
        for k in tensors
        if k.startswith("model.decoder.") and (("norm" in k and k.endswith(".weight")) or k.endswith(scalar_suffixes))
    ]
    # 7 layer norms + q/k norms + 2 router scales + layer_scalar per layer, final norm, self-cond pre_norm.
    assert len(scale_keys) == 6 * 12 + 2
    for key in scale_keys:
        assert bool((tensors[key] != 1).all()), key
        assert bool(((tensors[key] > 0.4) & (tensors[key] < 1.6)).all()), key
    for i in range(6):
        enc = tensors[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        assert torch.equal(enc, tensors[f"model.decoder.layers.{i}.layer_scalar"])


def test_build_is_deterministic_per_seed(tmp_path):
    a = _tensors(build_checkpoint(tmp_path / "a", seed=3, num_layers=3, tokenizer=False))
    b = _tensors(build_checkpoint(tmp_path / "b", seed=3, num_layers=3, tokenizer=False))
    c = _tensors(build_checkpoint(tmp_path / "c", seed=4, num_layers=3, tokenizer=False))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.decoder.layers.0.layer_scalar"], c["model.decoder.layers.0.layer_scalar"])


def test_bf16_checkpoint_without_tokenizer(tmp_path, load_reference):
    path = build_checkpoint(tmp_path, dtype="bfloat16", tokenizer=False, num_layers=3, vocab_size=96)
    assert not (path / "tokenizer.json").exists()
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(path).values())
    model = load_reference(path, dtype="bfloat16")
    assert model.config.text_config.vocab_size == 96
    assert model.model.decoder.embed_tokens.weight.dtype == torch.bfloat16


def test_vocab_smaller_than_tokenizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_checkpoint(tmp_path, vocab_size=TOKENIZER_VOCAB_SIZE - 1)


def test_reference_logits_are_finite_and_peaked(tiny_reference):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, TOKENIZER_VOCAB_SIZE, (1, 12), generator=gen)
    canvas = torch.randint(0, TOKENIZER_VOCAB_SIZE, (1, 8), generator=gen)
    with torch.no_grad():
        logits = tiny_reference(input_ids=prompt, decoder_input_ids=canvas).logits
    assert logits.shape == (1, 8, TOKENIZER_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.softmax(-1).max(-1).values.mean() > 0.05  # far from uniform (1/512)


# --- generation config ----------------------------------------------------------------------------------


def test_generation_config_has_released_values(tiny_ckpt):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    config = DiffusionGemmaGenerationConfig.from_pretrained(tiny_ckpt)
    assert config.max_new_tokens == 256
    assert config.max_denoising_steps == 48
    assert isinstance(config.sampler_config, EntropyBoundSamplerConfig)
    assert config.sampler_config.entropy_bound == 0.1
    assert (config.t_min, config.t_max) == (0.4, 0.8)
    assert config.stability_threshold == 1
    assert config.confidence_threshold == 0.005
    assert config.eos_token_id == [1, 106, 50]
    assert (config.pad_token_id, config.bos_token_id) == (0, 2)
    raw = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert {k: raw[k] for k in RELEASED_GENERATION_CONFIG} == RELEASED_GENERATION_CONFIG


def test_generation_nulls_is_the_fresh_save_pretrained_form(tmp_path):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    path = build_checkpoint(tmp_path, tokenizer=False, num_layers=3, generation_nulls=True)
    raw = json.loads((path / "generation_config.json").read_text())
    fields = ("max_denoising_steps", "sampler_config", "t_min", "t_max", "stability_threshold", "confidence_threshold")
    assert all(k in raw and raw[k] is None for k in fields)
    config = DiffusionGemmaGenerationConfig.from_pretrained(path)
    assert all(getattr(config, k) is None for k in fields)


# --- tokenizer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def mlx_tokenizer(tiny_ckpt):
    from mlx_lm.tokenizer_utils import load

    return load(tiny_ckpt)


def test_tokenizer_special_ids(hf_tokenizer):
    tok = hf_tokenizer
    assert len(tok) == TOKENIZER_VOCAB_SIZE
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == 4
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4, 50, 105, 106]) == [
        "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool_response>", "<|turn>", "<turn|>"
    ]  # fmt: skip
    for token_id, token in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    for token_id, token in SPECIAL_TOKENS.items():
        assert tok.added_tokens_decoder[token_id].content == token
        assert tok.added_tokens_decoder[token_id].special


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS + ["café 🙂 naïve"])
def test_tokenizer_roundtrip(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text)
    assert ids[0] == SPECIAL_IDS["<bos>"]
    assert SPECIAL_IDS["<unk>"] not in ids  # byte fallback covers everything
    assert all(0 <= i < TOKENIZER_VOCAB_SIZE for i in ids)
    assert hf_tokenizer.decode(ids[1:]) == text
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_merges_words(hf_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < 0.7 * len(text)  # BPE merges, not characters


def test_mlx_lm_loads_tokenizer_with_spm_detokenizer(mlx_tokenizer):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    assert isinstance(mlx_tokenizer.detokenizer, SPMStreamingDetokenizer)
    assert mlx_tokenizer.has_thinking
    assert mlx_tokenizer.think_start == "<|channel>thought"
    assert mlx_tokenizer.has_tool_calling
    assert mlx_tokenizer.tool_call_start == "<|tool_call>"


@pytest.mark.parametrize("text", ROUNDTRIP_TEXTS + ["multi-byte: café 🙂 日本"])
def test_mlx_lm_streaming_detokenizer(mlx_tokenizer, text):
    detok = mlx_tokenizer.detokenizer
    detok.reset()
    pieces = []
    for token in mlx_tokenizer.encode(text, add_special_tokens=False):
        detok.add_token(token)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


# --- chat template --------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<|channel>thought\nSay hello.<channel|>Hello!"},
    {"role": "user", "content": [{"type": "text", "text": "Add 2 and 3."}]},
]


def test_chat_template_gemma4_format(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><|turn>system\nYou are terse.<turn|>\n"
        "<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nAdd 2 and 3.<turn|>\n"
        "<|turn>model\n"
    )
    no_prompt = hf_tokenizer.apply_chat_template(CHAT[1:2], tokenize=False)
    assert no_prompt == "<bos><|turn>user\nHi<turn|>\n"
    ids = hf_tokenizer.apply_chat_template(CHAT[1:2], add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [SPECIAL_IDS["<bos>"], SPECIAL_IDS["<|turn>"]]
    assert ids.count(SPECIAL_IDS["<bos>"]) == 1
    assert SPECIAL_IDS["<turn|>"] in ids
    assert hf_tokenizer.decode(ids) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_chat_template_enable_thinking(hf_tokenizer):
    render = hf_tokenizer.apply_chat_template
    off = render(CHAT[1:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == render(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert off == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    on = render(CHAT[1:2], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert on == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    on_sys = render(CHAT[:2], tokenize=False, enable_thinking=True)
    assert on_sys == "<bos><|turn>system\n<|think|>You are terse.<turn|>\n<|turn>user\nHi<turn|>\n"


def test_chat_template_tool_calls_parse_with_mlx_lm(hf_tokenizer, mlx_tokenizer):
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": "three"}}}],
        },
        {"role": "tool", "content": "5"},
    ]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    call = '<|tool_call>call:add{a:2,b:<|"|>three<|"|>}<tool_call|>'
    assert text == (
        "<bos><|turn>user\nAdd 2 and 3.<turn|>\n"
        f"<|turn>model\n{call}<turn|>\n"
        "<|turn>tool\n<|tool_response>5<tool_response|><turn|>\n"
    )
    inner = call[len("<|tool_call>") : -len("<tool_call|>")]
    assert mlx_tokenizer.tool_parser(inner, None) == {"name": "add", "arguments": {"a": 2, "b": "three"}}
    # Tool markers survive decoding when special tokens are kept.
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text


def test_mlx_lm_renders_the_same_template(hf_tokenizer, mlx_tokenizer):
    expected = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    kwargs = {"add_generation_prompt": True, "enable_thinking": False}
    assert mlx_tokenizer.apply_chat_template(CHAT, tokenize=False, **kwargs) == expected
    ids = mlx_tokenizer.apply_chat_template(CHAT, **kwargs)
    assert ids == hf_tokenizer.encode(expected, add_special_tokens=False)
