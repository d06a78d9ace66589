"""The OpenAI request bodies the server accepts, checked field by field, and its error format.

Validation happens here, before anything is queued or allocated: a wrong type, an unknown model, a drafter
that is not a preset name, a sampling option the diffusion sampler cannot honour, all answer 400 with the
field named. Fields we cannot honour are refused, never silently ignored; fields that only label a request
(`user`, `metadata`, `store`, ...) are accepted and have no effect.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

MAX_STOP = 4


class APIError(Exception):
    """An OpenAI-format error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: Union[StrictStr, dict[str, Any]]


class ToolCall(_Strict):
    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None
    name: Optional[StrictStr] = None


class Function(_Strict):
    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[\w-]+$")
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**64)
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Union[StrictFloat, StrictInt, None] = Field(None, ge=0, le=2)
    top_p: Union[StrictFloat, StrictInt, None] = Field(None, ge=0, le=1)
    n: Optional[StrictInt] = None
    drafter: Optional[StrictStr] = None  # extension: a drafter preset name (never a file)
    stream_drafts: StrictBool = False  # extension: also stream the live canvas drafts


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], dict[str, Any], None] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]


# Fields whose non-default values this sampler cannot honour (name -> the values accepted).
_UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False),
    "suffix": (None, ""), "top_k": (None,), "min_p": (None,), "repetition_penalty": (None,),
}


def parse(body: bytes, schema: type[_Common]) -> _Common:
    """A request body as `schema`, or `APIError` 400 naming what is wrong."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = schema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _union_tag(p)) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    for name, accepted in _UNSUPPORTED.items():
        if name in raw and raw[name] not in accepted:
            raise APIError(400, f"{name} is not supported by the diffusion sampler (got {raw[name]!r})", param=name)
    _check_common(request)
    return request


def _union_tag(part: str | int) -> bool:
    """Pydantic names the member of a union it tried (`str`, `list[TextPart]`): not part of the field's path."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part)


def _check_common(request: _Common) -> None:
    if request.n not in (None, 1):
        raise APIError(400, "n: one choice per request (n=1); send several requests instead", param="n")
    if request.top_p not in (None, 1, 1.0):
        raise APIError(400, "top_p: the diffusion sampler draws from the whole distribution; only top_p=1 "
                       "(or leaving it out) is accepted", param="top_p")
    if request.temperature == 0:
        raise APIError(400, "temperature: the diffusion sampler has no greedy mode (every canvas starts from "
                       "random tokens); use a temperature in (0, 2] and a seed for reproducible text",
                       param="temperature")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} sequences (got {len(stops)})", param="stop")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only with stream=true", param="stream_options")
    if isinstance(request, ChatRequest) and request.tool_choice not in (None, "auto", "none"):
        raise APIError(400, 'tool_choice: "auto" and "none" only (the sampler cannot force a call)',
                       param="tool_choice")


def stops(request: _Common) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: `developer` is `system`, text parts joined, and each
    tool call's JSON `arguments` string a dict (the template renders its keys in order)."""
    out = []
    for i, m in enumerate(request.messages):
        content = m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content)
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, f"messages.{i}.tool_calls: only assistant messages carry tool calls",
                               param=f"messages.{i}.tool_calls")
            message["tool_calls"] = [_call(c, f"messages.{i}.tool_calls.{j}") for j, c in enumerate(m.tool_calls)]
        if m.role == "tool" and m.content is None:
            raise APIError(400, f"messages.{i}.content: a tool message needs the tool's result",
                           param=f"messages.{i}.content")
        out.append(message)
    return out


def _call(call: ToolCall, where: str) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"{where}.function.arguments: not valid JSON", param=f"{where}.function.arguments")
        if not isinstance(arguments, dict):
            raise APIError(400, f"{where}.function.arguments: must be a JSON object",
                           param=f"{where}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def tools(request: ChatRequest) -> list[dict[str, Any]] | None:
    """The declared tools as the template takes them (none when `tool_choice` is "none")."""
    if not request.tools or request.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in request.tools]
