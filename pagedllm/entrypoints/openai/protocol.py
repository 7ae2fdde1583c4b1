"""Request schemas of the OpenAI-compatible API, and its error shape.

The field policy is vLLM's, because real clients send fields they do not expect a server to
act on (`user`, `store`, `metadata`, `best_of: 1`, an echoed assistant message's
`refusal: null`): an unknown field is accepted and ignored, and the endpoint logs one warning
naming the ignored fields of the request (`ignored_fields`). A known field whose meaning we do
not implement and which would change the answer (`suffix`, a streamed `best_of > n`,
`functions`, audio output) stays a 400 naming it (`check_unsupported`): ignoring it would
return a different answer than the client asked for. Implemented fields accept an explicit null, meaning "the
default". Unions (`stop`, `prompt`, message `content`) are checked by hand so that an error
names the field plainly instead of listing every member of the union. Responses are plain dicts
built by serving_*.py.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagedllm.entrypoints.openai import request_fields
from pagedllm.entrypoints.openai.errors import APIError, validation_error  # noqa: F401 (API)
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

# OpenAI caps chat top_logprobs at 20; we use the same cap for completions' logprobs.
MAX_LOGPROBS = 20
# What one request may ask for; each bound keeps one request from costing the server what a
# thousand normal ones do. n (<= MAX_N) and the other sampling bounds live in SamplingParams.
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_STOP_STRINGS = 16  # each is matched against the new text of every sequence, every step
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_ALLOWED_TOKEN_IDS = 65536
MAX_BAD_WORDS = 64
# Our schemas nest 5 deep (messages[0].content[0].text); anything past this is not ours.
MAX_JSON_DEPTH = 32


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
    # Unknown fields land in `model_extra` (see the module docstring).
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Dotted paths of the fields this request carried that nothing reads."""
        names = [prefix + k for k in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, OpenAIBaseModel):
                    index = f"[{i}]" if isinstance(value, list) else ""
                    names += item.ignored_fields(f"{prefix}{name}{index}.")
        return names


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    # vLLM's extension (guidellm sends it): usage on every chunk, not only the last.
    continuous_usage_stats: bool | None = False


class ChatMessage(OpenAIBaseModel):
    """One message. Besides role and content, the fields an agent loop echoes back
    (`resp.choices[0].message.model_dump()`) and the tool-call turn fields are accepted and
    handed to the chat template, as transformers' apply_chat_template takes them."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: which call this answers
    # In every echoed assistant message; they carry nothing the template renders.
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> str | None:
        """A string, or a list of {"type": "text", "text": ...} parts (joined by newlines);
        null only for an assistant turn that made tool calls (checked in `check_message`)."""
        if value is None or isinstance(value, str):
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

    def check_message(self, index: int) -> None:
        where = f"messages[{index}]"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise APIError(400, f"{where}.content must not be null (only an assistant message "
                           "with tool_calls may omit it)", param=f"{where}.content")
        if self.role == "tool" and not self.tool_call_id:
            raise APIError(400, f"{where}.tool_call_id is required in a tool message",
                           param=f"{where}.tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise APIError(400, f"{where}.tool_calls is only allowed in an assistant message",
                           param=f"{where}.tool_calls")

    def to_template(self) -> dict:
        """The message as chat templates read it (transformers' conversation format)."""
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        out: dict = {"role": "system" if self.role == "developer" else self.role,
                     "content": self.content if self.content is not None else ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            # Templates (Qwen, Hermes) read arguments as a mapping; OpenAI sends a JSON string.
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        return out


def _template_tool_call(call: dict) -> dict:
    fn = call.get("function")
    fn = dict(fn) if isinstance(fn, dict) else {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # not JSON: the template gets the text
    return {**call, "function": fn}


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
    user: str | None = None  # the end user: the fair scheduling policy's client
    best_of: int | None = None  # > n: the n best by cumulative logprob (not streamed)
    # vLLM's extensions that shape the logits (SamplingParams has their meaning).
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = Field(default=None, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    # Structured output: vLLM's current `structured_outputs` and its older `guided_*` names.
    structured_outputs: dict | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: dict | None = None
    # vLLM's extension: requests with different salts never share prefix-cache blocks.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # vLLM's extension: the priority policy runs smaller values first (else it must be 0).
    priority: int | None = 0
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

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def check_unsupported(self) -> None:
        """400 for a field that would change the answer and that we do not implement."""
        request_fields.check_unsupported(self)

    def structured_output_params(self, compact_json: bool = False
                                 ) -> StructuredOutputsParams | None:
        return request_fields.structured_output_params(self, compact_json)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None, compact_json: bool = False,
                           defaults: dict | None = None) -> SamplingParams:
        """Raises ValueError naming the field for out-of-range values. ``compact_json`` is the
        server's default for ``disable_any_whitespace`` (a request's structured_outputs may
        set it itself). ``defaults``: the model's generation_config.json values, for the
        sampling fields the request leaves unset."""
        defaults = defaults or {}

        def pick(value, default, name: str = ""):
            return defaults.get(name, default) if value is None else value

        return SamplingParams(
            n=pick(self.n, 1),
            best_of=self.best_of,
            temperature=pick(self.temperature, 1.0, "temperature"),
            top_p=pick(self.top_p, 1.0, "top_p"),
            top_k=pick(self.top_k, 0, "top_k"),
            min_p=pick(self.min_p, 0.0, "min_p"),
            repetition_penalty=pick(self.repetition_penalty, 1.0, "repetition_penalty"),
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
            logit_bias=request_fields.logit_bias_ids(self),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=self.structured_output_params(compact_json),
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # accepted; a model may call several either way

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
