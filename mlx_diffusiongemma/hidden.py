"""Tokens a user never sees: dropped from generated text and live drafts, and not counted as generated.

Block diffusion drafts whole canvases, so a canvas can hold tokens that only fill positions: `<pad>` (the
model's and the reference's filler; transformers' decode skips it), and the other control tokens the
tokenizer names by role, `<bos>`, `<unk>` and `<mask>`, which mean nothing as output. EOS ends the text
and is cut separately. Everything else is shown, including Gemma 4's `<|channel>`/`<channel|>` (thinking)
and `<|tool_call>`/`<tool_call|>` markers: chat and tool-call parsers read them from the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

HIDDEN_ROLES = ("pad_token", "bos_token", "unk_token", "mask_token")


def hidden_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's pad, bos, unk and mask tokens, and the model's own pad id."""
    ids = {getattr(tokenizer, f"{role}_id", None) for role in HIDDEN_ROLES}  # mlx-lm's wrapper forwards these
    generation = getattr(model, "generation_config", None) or {}
    pad = generation.get("pad_token_id")
    ids.add(model.args.pad_token_id if pad is None else pad)
    return frozenset(i for i in ids if isinstance(i, int))


def visible(tokens: Sequence[int], hidden: Iterable[int]) -> list[int]:
    """`tokens` without the hidden ones, in order."""
    hidden = hidden if isinstance(hidden, (set, frozenset)) else frozenset(hidden)
    return [t for t in tokens if t not in hidden]
