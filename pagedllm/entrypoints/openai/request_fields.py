"""The request fields that decide what a sampling request may ask for beyond the sampling
knobs: which fields are refused (they would change the answer and are not implemented), the
structured-output constraint in whichever spelling it came, and logit_bias's token ids.
Functions of a chat or completion request (protocol._SamplingRequest calls them)."""

from __future__ import annotations

import json
from typing import Any

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.sampling_params import StructuredOutputsParams

# Fields that would change the answer if honoured and that pagedllm does not implement: a 400
# naming the field when they are set to anything but "off", instead of an answer that silently
# differs from what the client asked for (e.g. `suffix`: text after the insertion point).
_UNSUPPORTED = {
    "suffix": "pagedllm does not implement insertion (fill-in-the-middle) completions",
    "functions": "the legacy `functions` API is not implemented; use `tools`",
    "function_call": "the legacy `function_call` API is not implemented; use `tool_choice`",
    "audio": "audio output is not implemented",
    "web_search_options": "web search is not implemented",
    "use_beam_search": "beam search is only offered offline (LLM.beam_search)",
}


def _is_off(name: str, value: Any) -> bool:
    if name == "modalities":
        return value is None or value == ["text"]
    return value in (None, False, "", [], {})


def check_unsupported(request) -> None:
    """400 for a field that would change the answer and that we do not implement."""
    extra = request.model_extra or {}
    for name, why in _UNSUPPORTED.items():
        value = extra.get(name, getattr(request, name, None))
        if not _is_off(name, value):
            raise APIError(400, f"Unsupported field '{name}': {why}", param=name)
    if not _is_off("modalities", extra.get("modalities")):
        raise APIError(400, "Unsupported field 'modalities': only text output is "
                       "implemented", param="modalities")
    if request.best_of is not None:
        n = 1 if request.n is None else request.n
        if request.best_of < n:
            raise APIError(400, f"best_of must be >= n, got best_of={request.best_of} < n={n}",
                           param="best_of")
        if request.best_of > n and request.stream:
            # As OpenAI's: the n best are known only when all best_of samples have ended.
            raise APIError(400, f"Field 'best_of' > n (got best_of={request.best_of}, n={n}) "
                           "cannot be streamed: the n best are chosen at the end; send "
                           "stream=false",
                           param="best_of")


def structured_output_params(request, compact_json: bool = False
                             ) -> StructuredOutputsParams | None:
    """The one structured-output constraint of the request, from whichever spelling it
    came in (`response_format`, `structured_outputs`, `guided_*`); at most one is allowed."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = request.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise APIError(400, "response_format.json_schema.schema must be a JSON "
                               "Schema object", param="response_format.json_schema.schema")
            found.append(("response_format", StructuredOutputsParams(json=schema)))
        elif kind != "text":
            raise APIError(400, "response_format.type must be 'text', 'json_object' or "
                           f"'json_schema', got {kind!r}", param="response_format.type")
    if request.structured_outputs is not None:
        try:
            so = StructuredOutputsParams(**{"disable_any_whitespace": compact_json,
                                            **request.structured_outputs})
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"Invalid value for 'structured_outputs': {exc}",
                           param="structured_outputs") from None
        found.append(("structured_outputs", so))
    legacy = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "grammar"}
    for field, key in legacy.items():
        value = getattr(request, field)
        if value is not None:
            if field == "guided_json" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise APIError(400, "guided_json must be a JSON Schema (an object or "
                                   "its JSON text)", param=field) from None
            try:
                found.append((field, StructuredOutputsParams(**{key: value})))
            except ValueError as exc:
                raise APIError(400, f"Invalid value for '{field}': {exc}",
                               param=field) from None
    if len(found) > 1:
        raise APIError(400, f"only one structured-output constraint is allowed, got "
                       f"{[f for f, _ in found]}", param=found[1][0])
    if not found:
        return None
    field, so = found[0]
    if compact_json and field != "structured_outputs":
        so.disable_any_whitespace = True
    return so

def logit_bias_ids(request) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    out = {}
    for key, value in request.logit_bias.items():
        if not key.lstrip("-").isdigit():
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                           param="logit_bias")
        out[int(key)] = value
    return out
