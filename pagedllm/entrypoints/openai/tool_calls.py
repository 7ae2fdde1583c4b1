"""Tool calling: what to constrain, how to read calls out of the text, how to stream them.

    tool_choice   prompt gets tools   output constrained to              calls read by
    "none"        no                  nothing                            -
    "auto"        yes                 nothing (the model decides)        --tool-call-parser
    "required"    yes                 a JSON array [{name, parameters}]  JsonCalls (always parses)
    {function}    yes                 that function's parameters         JsonCalls (always parses)

"required" and a named function are enforced by the grammar engine, so their output always
parses and names a declared function; "auto" reads the model's own format: Hermes-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (SmolLM2, Qwen, Hermes).

Streaming follows OpenAI's shape: a call's first delta carries index, id, type and name with
empty arguments; later deltas append to arguments. Concatenating them gives the non-streamed
call (here a call is sent once it is complete: its arguments arrive in one delta).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pagedllm.entrypoints.openai.protocol import APIError
from pagedllm.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes",)


def make_call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def check_tools(tools: list[dict] | None, tool_choice: Any, parser: str | None) -> str | None:
    """The request's tool mode ('none', 'auto', 'required', or the named function), or None
    when it has no tools. A 400 names what is wrong."""
    names = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"] \
                or not isinstance(fn.get("parameters", {}), (dict, type(None))):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': "
                           "{'name': ..., 'parameters': {...}}}", param=f"tools[{i}]")
        names.append(fn["name"])
    if tool_choice is None:
        tool_choice = "auto" if names else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools",
                           param="tool_choice")
        return name
    if tool_choice not in ("none", "auto", "required"):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if tool_choice != "none" and not names:
        raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
    if tool_choice == "auto" and parser is None:
        raise APIError(400, "tool_choice 'auto' needs the server started with "
                       "--tool-call-parser (e.g. hermes); 'required' and a named function "
                       "work without one", param="tool_choice")
    return tool_choice if names else None


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def constraint(tools: list[dict], mode: str) -> StructuredOutputsParams | None:
    """The grammar that makes 'required' / named output parse (None for none / auto)."""
    if mode in ("none", "auto"):
        return None
    by_name = {t["function"]["name"]: t for t in tools}
    if mode != "required":
        return StructuredOutputsParams(json=_parameters(by_name[mode]))
    call = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": name}, "parameters": _parameters(tool)},
        "required": ["name", "parameters"], "additionalProperties": False}
        for name, tool in by_name.items()]}
    return StructuredOutputsParams(json={"type": "array", "items": call, "minItems": 1})


class JsonCalls:
    """Reads the constrained output of 'required' (a JSON array) or a named function (its
    arguments). The grammar guarantees it parses unless the output was cut by max_tokens."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.text = ""

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        try:
            value = json.loads(text)
        except ValueError:
            return text, []  # cut off (finish_reason "length"): the text as content
        if self.mode == "required":
            return None, [make_call(c["name"], c["parameters"]) for c in value]
        return None, [make_call(self.mode, value)]

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        return []  # nothing is known until the JSON is complete

    def finish(self) -> list[dict]:
        content, calls = self.extract(self.text)
        return _deltas(content, calls, 0)


class HermesCalls:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text; the text before the first
    is content. A block that does not parse stays in the content, as the model wrote it."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, mode: str = "auto") -> None:
        self.buffer = ""  # text not yet streamed
        self.num_calls = 0

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        content, calls, rest = [], [], text
        while self.START in rest:
            before, _, after = rest.partition(self.START)
            body, closed, rest = after.partition(self.END)
            call = _parse_hermes(body) if closed else None
            if call is None:
                content.append(before + self.START + body + (self.END if closed else ""))
                continue
            content.append(before)
            calls.append(call)
        content.append(rest)
        text = "".join(content).strip()
        return (text or None) if calls else "".join(content), calls

    def feed(self, delta: str) -> list[dict]:
        self.buffer += delta
        out = []
        while True:
            start = self.buffer.find(self.START)
            if start < 0:
                # Hold back a tail that may be the start of "<tool_call>".
                keep = next((k for k in range(len(self.START) - 1, 0, -1)
                             if self.buffer.endswith(self.START[:k])), 0)
                text, self.buffer = self.buffer[:len(self.buffer) - keep], \
                    self.buffer[len(self.buffer) - keep:]
                if text:
                    out.append({"content": text})
                return out
            if start > 0:
                out.append({"content": self.buffer[:start]})
                self.buffer = self.buffer[start:]
            end = self.buffer.find(self.END)
            if end < 0:
                return out  # a call in progress: wait for its end
            body = self.buffer[len(self.START):end]
            self.buffer = self.buffer[end + len(self.END):]
            call = _parse_hermes(body)
            if call is None:
                out.append({"content": self.START + body + self.END})
            else:
                out += _deltas(None, [call], self.num_calls)
                self.num_calls += 1

    def finish(self) -> list[dict]:
        rest, self.buffer = self.buffer, ""
        return [{"content": rest}] if rest else []


def _parse_hermes(body: str) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return make_call(value["name"], value.get("arguments", value.get("parameters", {})))


def _deltas(content: str | None, calls: list[dict], first_index: int) -> list[dict]:
    """OpenAI's stream shape for whole calls: header (id, name, empty arguments), then the
    arguments."""
    out = [{"content": content}] if content else []
    for k, call in enumerate(calls):
        index = first_index + k
        out.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"],
                                                 "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {
            "arguments": call["function"]["arguments"]}}]})
    return out


def tool_parser(mode: str | None, parser: str | None):
    """The reader of a request's output, or None when its text is plain content."""
    if mode is None or mode == "none":
        return None
    if mode == "auto":
        return HermesCalls()
    return JsonCalls(mode)
