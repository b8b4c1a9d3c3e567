"""The OpenAI request bodies we take, and the response objects and stream chunks we send.

Fields OpenAI clients send that we do not use are accepted and ignored; `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos` are extensions (as in vLLM), passed by the openai client
through `extra_body`. Values out of range get a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from saguaro.sampling import MAX_LOGPROBS, ParamError, SamplingParams
from saguaro.serve.errors import APIError

MAX_STOP_STRINGS = 4
MAX_N = 128  # as OpenAI
SEED_RANGE = (0, 2**63 - 1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """How many top log-probs per token (None: no log-probs), checked against this API's range."""
        return None

    def field_name(self, param: str) -> str:
        """The request's name for a SamplingParams field."""
        return param

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's settings (n choices of them); APIError 400 naming the field if one is out of range."""
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise APIError(400, f"seed must be in [0, 2**63), got {self.seed}", param="seed")
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        max_tokens = self.requested_max_tokens
        optional = {name: getattr(self, name) for name in ("min_p", "presence_penalty", "frequency_penalty",
                                                            "repetition_penalty") if getattr(self, name) is not None}
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                seed=self.seed, ignore_eos=self.ignore_eos, stop=stop, n=self.n, logit_bias=bias,
                logprobs=self.requested_logprobs(), **optional,
            )
        except ParamError as e:
            name = self.field_name(e.param)
            message = str(e)
            if message.startswith(e.param):
                message = name + message[len(e.param):]
            raise APIError(400, message, param=name) from None


MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's legacy completions


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    best_of: int | None = None

    def requested_logprobs(self) -> int | None:
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of is not supported (got best_of={self.best_of}, n={self.n}): every one of "
                           "the n samples is returned; send n alone", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}",
                           param="logprobs")
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise APIError(400, "one prompt per request (send concurrent requests; they are batched)",
                               param="prompt")
            p = p[0]
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def field_name(self, param: str) -> str:
        if param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return param


# ---------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shaper:
    """Builds the response objects of one request (completion or chat), whole or as chunks."""

    def __init__(self, chat: bool, model: str, fingerprint: str):
        self.chat, self.model, self.fingerprint = chat, model, fingerprint
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def whole(self, choices: list[tuple[str, str | None, dict | None]], prompt_tokens: int,
              completion_tokens: int) -> dict:
        """choices: (text, finish_reason, logprobs object or None) per choice, in index order."""
        if self.chat:
            out = self._envelope("chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                 "finish_reason": finish} for i, (text, finish, logprobs) in enumerate(choices)])
        else:
            out = self._envelope("text_completion", [
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
                for i, (text, finish, logprobs) in enumerate(choices)])
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out
