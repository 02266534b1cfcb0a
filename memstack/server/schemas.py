"""Request models (pydantic): every field typed, bounded and strict, so bad input is a 400 naming
the field, and nothing that reaches the engine can be NaN, infinite, out of range or of the wrong
type (`top_k: 2.5`, `seed: 2**70`, `"ttl": "10"`, `temperature: NaN` are all refused here).

Shapes follow OpenAI's API (completions, chat completions); `top_k` is an extension (as in vLLM).
Fields OpenAI has but memstack does not implement are accepted only at their neutral value
(`frequency_penalty: 0`, ...), so nothing is silently ignored; unknown fields are refused.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

MAX_SEED = 2**63 - 1
MAX_INT = 2**31 - 1


def Int(ge: int = 0, le: int = MAX_INT):  # noqa: N802 -- a type factory
    return Annotated[int, Strict(), Field(ge=ge, le=le)]


def Float(ge: float | None = None, le: float | None = None, gt: float | None = None):  # noqa: N802
    return Annotated[float, Strict(), Field(ge=ge, le=le, gt=gt, allow_inf_nan=False)]


Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
TokenId = Int(0, MAX_INT)
StopStr = Annotated[str, Strict(), Field(min_length=1, max_length=256)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Model):
    include_usage: Bool = False


SESSION_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class SamplingFields(Model):
    """What completions and chat completions share."""

    model: Annotated[str, Field(max_length=256)] | None = None
    max_tokens: Int(1) | None = Field(None, description="tokens to generate at most (>= 1)")
    temperature: Float(ge=0, le=2) | None = Field(None, description="0: greedy; below 1e-5 counts as 0")
    top_p: Float(gt=0, le=1) | None = None
    top_k: Int(0) | None = Field(None, description="extension: keep the k most likely tokens (0: off)")
    n: Int(1, 128) = 1
    stop: StopStr | Annotated[list[StopStr], Field(max_length=16)] | None = None
    seed: Int(0, MAX_SEED) | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Float(ge=-2, le=2) = 0.0
    presence_penalty: Float(ge=-2, le=2) = 0.0
    logit_bias: dict[str, Float(ge=-100, le=100)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    task: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="extension: one of the tenant's tasks; its memory is read with the user's")
    session: Annotated[str, Field(pattern=SESSION_ID)] | None = Field(
        None, description="extension: continue this memory session (POST /v1/sessions); n must be 1")
    return_token_ids: Bool = Field(False, description="extension: add each choice's generated ids (token_ids)")
    ignore_eos: Bool = Field(False, description="extension: do not stop at end-of-text (benchmarks)")

    @model_validator(mode="after")
    def _unsupported(self):
        reasons = []
        if self.frequency_penalty != 0:
            reasons.append("frequency_penalty: not supported (only 0)")
        if self.presence_penalty != 0:
            reasons.append("presence_penalty: not supported (only 0)")
        if self.logit_bias:
            reasons.append("logit_bias: not supported (only empty)")
        if self.stream_options is not None and not self.stream:
            reasons.append("stream_options: only allowed with stream=true")
        if self.session is not None and self.n != 1:
            reasons.append("n: a session runs one request at a time (n must be 1 with session)")
        if reasons:
            raise ValueError("; ".join(reasons))
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Prompt = (Annotated[str, Strict()] | Annotated[list[Str], Field(min_length=1, max_length=64)]
          | Annotated[list[TokenId], Field(min_length=1)]
          | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)])


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: Bool = False
    logprobs: Int(0, 5) | None = None
    suffix: None = None
    best_of: Int(1, 128) | None = None

    @model_validator(mode="after")
    def _completion(self):
        reasons = []
        if self.best_of is not None and self.best_of != self.n:
            reasons.append("best_of: only best_of == n is supported")
        if self.echo and self.logprobs is not None:
            reasons.append("echo with logprobs: prompt logprobs are not supported")
        if reasons:
            raise ValueError("; ".join(reasons))
        return self


class TextPart(Model):
    type: Literal["text"]
    text: Str


class Message(Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(Model):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Int(1) | None = None
    logprobs: Bool = False
    top_logprobs: Int(0, 20) | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _chat(self):
        reasons = []
        if self.top_logprobs is not None and not self.logprobs:
            reasons.append("top_logprobs: needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            reasons.append("max_tokens and max_completion_tokens differ (give one)")
        if reasons:
            raise ValueError("; ".join(reasons))
        return self


class PrefixCreate(Model):
    """Pin a prompt prefix: its KV is computed once and kept until the TTL lapses or it is deleted."""

    prompt: Str | Annotated[list[TokenId], Field(min_length=1)]
    ttl: Float(gt=0) | None = Field(None, description="seconds (the server's default when omitted)")


__all__ = ["CompletionRequest", "ChatCompletionRequest", "Message", "PrefixCreate", "StreamOptions"]
