"""Tiny random DiffusionGemma checkpoints (and a real tiny tokenizer) for the test suite.

`build_checkpoint(path)` writes a folder that looks like a real DiffusionGemma checkpoint: a random
`transformers.DiffusionGemmaForBlockDiffusion` saved with `save_pretrained`, in either config layout
(spec §0), a `generation_config.json`, and a small byte-fallback BPE tokenizer with the Gemma 4
special tokens and chat format. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# --- tokenizer --------------------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 512

# Fixed ids. 0-4, 50, 105 and 106 are the released ones (spec §1.3); the rest are our choice.
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
SPECIAL_IDS = {token: i for i, token in SPECIAL_TOKENS.items()}

# Gemma 4 chat format (design.md): `<bos>`, then `<|turn>ROLE\n…<turn|>\n` per message, role `model` for
# the assistant. `enable_thinking` puts `<|think|>` at the start of the system turn; earlier thoughts
# (`<|channel>thought\n…<channel|>`) are dropped from model turns (design.md: the real template may do so).
CHAT_TEMPLATE = """
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- elif content is not none -%}
        {%- for part in content if part.type == 'text' -%}{{- part.text | trim -}}{%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set messages = messages | list -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if has_system or enable_thinking or tools -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
    {%- if has_system -%}{{- render_content(messages[0].content) -}}{%- endif -%}
    {%- for tool in tools or [] -%}
        {%- set fn = tool.function if tool.function is defined else tool -%}
        {{- '<|tool>declaration:' + fn.name + '{description:<|"|>' + (fn.description or '') + '<|"|>,parameters:{' -}}
        {%- for key, spec in ((fn.parameters or {}).properties or {}) | dictsort -%}
            {{- key + ':<|"|>' + ((spec.type or 'any') | upper) + '<|"|>' -}}
            {%- if not loop.last -%}{{- ',' -}}{%- endif -%}
        {%- endfor -%}
        {{- '}}<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- for message in turns -%}
    {%- if message.role == 'assistant' or message.role == 'model' -%}
        {{- '<|turn>model\n' -}}
        {{- (render_content(message.content).split('<channel|>') | last) | trim -}}
        {%- for call in message.tool_calls or [] -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {{- '<|tool_call>call:' + fn.name + '{' -}}
            {%- for key, value in fn.arguments | dictsort -%}
                {{- key + ':' -}}
                {%- if value is string -%}{{- '<|"|>' + value + '<|"|>' -}}
                {%- else -%}{{- value | tojson -}}{%- endif -%}
                {%- if not loop.last -%}{{- ',' -}}{%- endif -%}
            {%- endfor -%}
            {{- '}<tool_call|>' -}}
        {%- endfor -%}
        {{- '<turn|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {{- '<|turn>tool\n<|tool_response>' + render_content(message.content) + '<tool_response|><turn|>\n' -}}
    {%- else -%}
        {{- '<|turn>' + message.role + '\n' + render_content(message.content) + '<turn|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}
""".strip()

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A block diffusion model writes a whole canvas of tokens
at once and then refines it over a few denoising steps, keeping the tokens it is sure about.
The encoder reads the prompt from left to right and stores its keys and values in a cache.
The decoder looks at the cache and at the canvas in both directions, then predicts every position.
Hello, world! How are you today? I am fine, thank you. What is the time? It is 10:45 in the morning.
There are 7 days in a week, 12 months in a year, 24 hours in a day and 60 minutes in an hour.
In 1969 people walked on the moon. The year 2024 had 366 days. Pi is about 3.14159 and e is 2.71828.
Write a short poem about the sea. The sea is wide and blue, the waves are white, the wind is cold.
Please answer the question in one sentence. The answer is yes, because the number 42 is even.
Count from one to ten: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Then count back down to zero again.
She said that the weather would be warm, but it rained all day and the river rose over its banks.
We can train a small model on this text and test that the tokens come back as the same string.
def add(a, b): return a + b  # a tiny function with (brackets), [lists] and {braces}.
Email me at test@example.com or call 555-0100; the price is $19.99 (about 20%) plus tax.
Model: the capital of France is Paris. User: and the capital of Italy? Model: it is Rome.
This is a test of the streaming detokenizer: it must print each word as soon as it is ready.
The cat sat on the mat, the dog sat on the log, and the bird sang in the tree by the house.
"""


def build_tokenizer(path: Path) -> int:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`; return the vocab size.

    A Gemma-style BPE (spaces as "▁", byte fallback, single digits, no prefix space) trained on a small
    built-in English corpus, with the Gemma 4 special tokens at fixed ids (`SPECIAL_TOKENS`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    normalizer = normalizers.Replace(" ", "▁")
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )

    alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    n_ordinary = TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=n_ordinary - 256,
        min_frequency=2,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    ordinary = [f"<0x{b:02X}>" for b in range(256)] + learned
    ordinary += [f"<unused{i}>" for i in range(n_ordinary - len(ordinary))]
    free_ids = [i for i in range(TOKENIZER_VOCAB_SIZE) if i not in SPECIAL_TOKENS]
    assert len(ordinary) == len(free_ids), (len(ordinary), len(free_ids))
    vocab = dict(zip(ordinary, free_ids))
    vocab.update(SPECIAL_IDS)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    # Gemma's own pre-tokenizer (a no-op after the normalizer). Merges were learned within words and never
    # touch digits, so encoding matches the training pre-tokenizer, and transformers' GemmaTokenizer, which
    # rebuilds this pipeline, encodes the same as the `tokenizers` file does.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    # The exact decoder of Gemma's tokenizer.json; mlx-lm maps it to its SPM streaming detokenizer.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_IDS["<bos>"])]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == TOKENIZER_VOCAB_SIZE
    tok.save(str(path / "tokenizer.json"))

    special_map = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return TOKENIZER_VOCAB_SIZE


# --- model ------------------------------------------------------------------------------------------------

# The released diffusion settings (spec §1.3).
RELEASED_GENERATION_CONFIG = {
    "bos_token_id": 2,
    "pad_token_id": 0,
    "eos_token_id": [1, 106, 50],
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}

# Spec §7: a tiny Gemma 4 vision tower, so `vision_config` does not default to the 768x16-layer one.
TINY_VISION_CONFIG = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "position_embedding_size": 64,
    "patch_size": 4,
}


def tiny_text_config(num_layers: int = 6, sliding_window: int = 8, vocab_size: int = 64, **overrides) -> dict:
    """The tiny text config of spec §7: GQA on both layer types, full layers with their own head geometry."""
    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]
    config = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "global_head_dim": 16,
        "num_global_key_value_heads": 1,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 8,
        "sliding_window": sliding_window,
        "layer_types": layer_types,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": 512,
    }
    config.update(overrides)
    return config


def _check_ties(model) -> None:
    encoder = model.model.encoder.language_model
    decoder = dict(model.model.decoder.named_parameters())
    for name, param in encoder.named_parameters():
        assert decoder[name] is param, f"encoder text parameter {name} is not tied to the decoder's"
    assert model.lm_head.weight is decoder["embed_tokens.weight"]


def _randomise(model, embed_std: float | None) -> None:
    """Make every weight that initialises to 1 differ from 1, so a missing scale shows up in parity tests."""
    import torch

    decoder = model.model.decoder
    with torch.no_grad():
        if embed_std is not None:
            decoder.embed_tokens.weight.normal_(0.0, embed_std)
        for module in decoder.modules():
            if type(module).__name__.endswith("RMSNorm") and getattr(module, "with_scale", False):
                module.weight.uniform_(0.5, 1.5)
        for layer in decoder.layers:
            layer.router.scale.uniform_(0.5, 1.5)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
        encoder_layers = model.model.encoder.language_model.layers
        for decoder_layer, encoder_layer in zip(decoder.layers, encoder_layers, strict=True):
            decoder_layer.layer_scalar.uniform_(0.5, 1.5)
            # The converter clones both from the same JAX `skip_scale` (spec §2.3).
            encoder_layer.layer_scalar.copy_(decoder_layer.layer_scalar)


def _rewrite_hub_layout(config_path: Path) -> None:
    """Store the full-layer geometry as the released hub config.json does (spec §0)."""
    config = json.loads(config_path.read_text())
    text = config["text_config"]
    overrides = list(text.pop("per_layer_config", {}).values())
    assert all(o == overrides[0] for o in overrides), "hub layout needs identical full layers"
    override = overrides[0] if overrides else {}
    text["global_head_dim"] = override.get("head_dim", text["head_dim"])
    text["num_global_key_value_heads"] = override.get("num_key_value_heads", text["num_key_value_heads"])
    config["eos_token_id"] = [1, 106]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_checkpoint(
    path: Path,
    *,
    layout: str = "per_layer",
    seed: int = 0,
    num_layers: int = 6,
    sliding_window: int = 8,
    canvas_length: int = 8,
    dtype: str = "float32",
    tokenizer: bool = True,
    vocab_size: int | None = None,
    generation_nulls: bool = False,
    embed_std: float | None = 0.5,
    **text_overrides,
) -> Path:
    """Write a tiny random DiffusionGemma checkpoint folder and return its path.

    Args:
        path: output folder (created if needed).
        layout: "per_layer" (what transformers >= 5.23 writes) or "hub" (the released config.json form,
            with `global_head_dim` / `num_global_key_value_heads`).
        seed: seeds both the weights and the randomised scales.
        num_layers: 6 gives 5 sliding + 1 full; 3 gives [sliding, sliding, full].
        dtype: "float32" or "bfloat16" for the saved weights.
        tokenizer: also write the tiny tokenizer (`build_tokenizer`).
        vocab_size: defaults to the tokenizer's size (512), or 64 without a tokenizer. It may exceed the
            tokenizer's size (a padded vocab) but not fall below it.
        generation_nulls: keep the fresh `save_pretrained` generation_config.json (every diffusion field
            null) instead of the released values.
        embed_std: std of the (tied) embedding; 0.5 gives peaked next-token distributions (about 3 nats of
            entropy over 512 tokens) instead of transformers' near-uniform 0.02. None keeps the default init.
        text_overrides: update the text config dict (`tiny_text_config`).
    """
    import torch
    import transformers
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    if layout not in ("per_layer", "hub"):
        raise ValueError(f"unknown layout {layout!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer_size = build_tokenizer(path) if tokenizer else None
    if vocab_size is None:
        vocab_size = tokenizer_size or 64
    if tokenizer_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size}")

    text_config = tiny_text_config(num_layers, sliding_window, vocab_size, **text_overrides)
    config = DiffusionGemmaConfig(
        text_config=text_config, vision_config=dict(TINY_VISION_CONFIG), canvas_length=canvas_length
    )
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    _check_ties(model)
    _randomise(model, embed_std)
    model.to(torch_dtype).save_pretrained(path, safe_serialization=True)

    if layout == "hub":
        _rewrite_hub_layout(path / "config.json")
    if not generation_nulls:
        generation = dict(RELEASED_GENERATION_CONFIG, transformers_version=transformers.__version__)
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


def load_reference(path: Path, dtype: torch.dtype | str = "float32"):
    """The transformers reference model from `path`, in eval mode, with eager attention and experts."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.eval()


def decoder_logits_pair(ref, ours, prompt, canvas):
    """(transformers, ours) decoder logits as NumPy for `canvas` after encoding `prompt` (both int arrays)."""
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config.text_config)
    with torch.no_grad():
        ref.model.encoder(input_ids=torch.tensor(prompt), cache=cache)
        expected = ref(cache=cache, decoder_input_ids=torch.tensor(canvas)).logits.float().numpy()
    mcache = ours.make_cache()
    ours.encode(mx.array(prompt), mcache)
    return expected, np.array(ours.decode(mx.array(canvas), mcache))
