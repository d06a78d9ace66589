"""Fine-tuning data: JSONL records of chat messages (or prompt/completion pairs), checked line by line, and
their tokenization into `(ids, prompt length)` examples."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def _check_record(record) -> list[dict]:
    """Chat messages of one JSONL record; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError("each message needs a 'role' string and a 'content'")
        if messages[-1]["role"] not in ("assistant", "model"):
            raise ValueError("the last message must be the assistant's (the response to train on)")
        return messages
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")


def read_jsonl(path: str | Path) -> list[tuple[int, list[dict]]]:
    """`(line number, chat messages)` of every record of a JSONL file (blank lines skipped); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} is {'a folder' if path.is_dir() else 'missing'}; pass a JSONL file of records")
    records = []
    with open(path, "rb") as f:  # bytes, decoded per line, so an invalid UTF-8 line is named by its number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                records.append((lineno, _check_record(json.loads(line))))
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                if isinstance(e, UnicodeDecodeError):
                    reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save it as UTF-8"
                raise UsageError(f"{path}, line {lineno}: {reason}") from None
    if not records:
        raise UsageError(f"{path} has no training records")
    return records


def _ids(x) -> list[int]:
    if isinstance(x, dict):  # a BatchEncoding
        x = x["input_ids"]
    return list(x)


def tokenize(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """(ids of the whole conversation, length of the prompt: everything before the last assistant turn)."""
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True))
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise UsageError("the chat template does not render the prompt as a prefix of the conversation")
    return full, len(prompt)
