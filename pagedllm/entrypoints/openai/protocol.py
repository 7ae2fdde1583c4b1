"""Request schemas of the OpenAI-compatible API, and its error shape.

Every request model forbids unknown fields: a field we do not implement (`tools`,
`response_format`, `logit_bias`, `suffix`, `best_of`, ...) is a 400 naming it, never silently
ignored. Implemented fields accept an explicit null, meaning "the default". Unions (`stop`,
`prompt`, message `content`) are checked by hand so that an error names the field plainly
instead of listing every member of the union. Responses are plain dicts built by serving_*.py.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pagedllm.sampling_params import SamplingParams

# OpenAI caps chat top_logprobs at 20; we use the same cap for completions' logprobs.
MAX_LOGPROBS = 20
# What one request may ask for; each bound keeps one request from costing the server what a
# thousand normal ones do. n (<= MAX_N) and the other sampling bounds live in SamplingParams.
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_STOP_STRINGS = 16  # each is matched against the new text of every sequence, every step
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# Our schemas nest 5 deep (messages[0].content[0].text); anything past this is not ours.
MAX_JSON_DEPTH = 32


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field, e.g. `messages[0].name`."""
    err = exc.errors()[0]
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if err["type"] == "extra_forbidden":
        message = f"Unsupported field '{path}': pagedllm does not implement it"
    elif err["type"] == "missing":
        message = f"Missing required field '{path}'"
    else:
        reason = err["msg"].removeprefix("Value error, ")
        message = f"Invalid value for '{path}': {reason}" if path else reason
    return APIError(400, message, param=path or None)


class _NonFinite:
    """A JSON number that is not a finite float (`NaN`, `Infinity`, `1e999`): a marker kept
    until parse_json knows its field."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object whose numbers are finite and whose strings are valid
    Unicode; anything else is a 400 naming the field. Python's json module would accept
    `NaN`/`Infinity`, decode `"\\ud800"` to a lone surrogate (which no tokenizer or UTF-8
    encoder takes), and raise RecursionError, not ValueError, on very deep nesting."""
    try:
        value = json.loads(body, parse_constant=_NonFinite, parse_float=_parse_float)
    except RecursionError:  # deeper than the interpreter's stack
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") \
            from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise APIError(400, "the request body must be a JSON object")
    todo: list[tuple[str, Any, int]] = [("", value, 1)]  # (path, value, depth); no recursion
    while todo:
        path, item, depth = todo.pop()
        if isinstance(item, _NonFinite):
            raise APIError(400, f"Invalid value for '{path}': {item.text} is not a finite "
                           "number", param=path)
        if isinstance(item, str) and not _is_unicode(item):
            raise APIError(400, f"Invalid value for '{path}': the string holds a lone UTF-16 "
                           "surrogate (e.g. '\\ud800'), which is not valid Unicode", param=path)
        if isinstance(item, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, v in item.items():
                child = f"{path}.{key}" if path else key
                if not _is_unicode(key):
                    raise APIError(400, "a field name holds a lone UTF-16 surrogate, which is "
                                   "not valid Unicode")
                todo.append((child, v, depth + 1))
        elif isinstance(item, list):
            todo.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(item))
    return value


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str:
        """A string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and set(part) == {"type", "text"}):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) "
                                     "are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("content must be a string or a non-empty list of text parts")


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by chat and completions (OpenAI's plus vLLM's sampling extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for OpenAI compatibility; only echoed in logs
    # vLLM's extension: requests with different salts never share prefix-cache blocks.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    ignore_eos: bool | None = False
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, "
                             f"got {len(stops)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise ValueError(f"each stop string must be at most {MAX_STOP_STRING_CHARS} "
                             "characters long")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError naming the field for out-of-range values."""

        def pick(value, default):
            return default if value is None else value

        return SamplingParams(
            n=pick(self.n, 1),
            temperature=pick(self.temperature, 1.0),
            top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0),
            min_p=pick(self.min_p, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            ignore_eos=bool(self.ignore_eos),
            max_tokens=max_tokens,
            min_tokens=pick(self.min_tokens, 0),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=pick(self.skip_special_tokens, True),
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        # max_tokens is deprecated in OpenAI's chat API in favour of max_completion_tokens.
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs to be true",
                               param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                               f"{self.top_logprobs}", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    # str | list[str] | list[int] | list[list[int]]: normalized to a list of str / id lists.
    prompt: Any
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool | None = False
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        def is_ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in v)

        if isinstance(value, str) or (value and is_ids(value)):
            prompts = [value]  # one prompt
        elif isinstance(value, list) and value and (all(isinstance(v, str) for v in value)
                                                    or all(is_ids(v) for v in value)):
            prompts = value  # a batch
        else:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                             "or a list of token-id lists")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt must hold at most {MAX_PROMPTS} prompts, "
                             f"got {len(prompts)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty")
        return prompts

    def num_logprobs(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                           param="logprobs")
        return self.logprobs


class TokenizeRequest(OpenAIBaseModel):
    """Either `prompt` (plain text) or `messages` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]
