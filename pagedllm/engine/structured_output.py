"""Structured output: one grammar matcher per sequence, and the token bitmask the sampler applies.

    frontend  RequestValidator → validate(params)       grammar text checked, no tokenizer (ms)
    core      add_request → manager.compile(params)     a worker thread builds the matcher; the
                                                        request waits outside the scheduler
              step → manager.fill_bitmask(rows)         one int32 word per 32 tokens, per row
              Sampler → apply_token_bitmask             disallowed tokens' logits → -inf
              _append_token → matcher.consume_token     advances exactly once per output token

The grammar engine is llguidance (MIT; Rust, CPU only by design: masks take ~50 µs per row and
need no ahead-of-time compilation, so a new schema costs milliseconds, not a compile step).
Grammar texts are cached by spec; the expensive piece, the tokenizer's token trie, is built once
per core, in the worker thread, the first time a request needs it.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import torch

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger("pagedllm")

__all__ = ["StructuredOutputManager", "bad_word_bans", "bad_words_token_ids", "closed_objects",
           "grammar_text", "ll_tokenizer", "token_ids_bitmask", "validate"]


def _llguidance():
    try:
        import llguidance
    except ImportError:  # an optional dependency: pip install 'pagedllm[structured]'
        raise ValueError("structured output needs the llguidance package: "
                         "pip install 'pagedllm[structured]'") from None
    return llguidance


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (cached: agents send one schema many times)."""
    value = getattr(so, so.kind)
    if so.kind == "json_object":
        value = '{"type": "object"}'
    if so.kind in ("json", "json_object"):
        schema = json.loads(value) if isinstance(value, str) else value
        # NOTE: not sort_keys: llguidance writes properties in the schema's order (a pydantic
        # model's field order); closed_objects sorts the keywords alone.
        value = json.dumps(closed_objects(schema))
    elif so.kind == "choice":
        value = json.dumps(value)
    return _grammar_text(so.kind, value, so.disable_any_whitespace)


# Keywords whose value is one subschema, a list of them, or a name -> subschema map; every
# other keyword's value is data (const, enum, default, ...) or a number, and is left alone.
_ONE_SCHEMA = ("items", "additionalProperties", "additionalItems", "unevaluatedItems",
               "contains", "propertyNames", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN_KEYS = {"additionalProperties", "patternProperties", "unevaluatedProperties"}


def closed_objects(schema, close: bool = True):
    """The schema with `additionalProperties: false` on every object that lists `properties`
    and says nothing about others: output holds only the declared keys.

    JSON Schema admits undeclared keys by default, and a model under a grammar may then write
    keys (and text) without end. vLLM's default grammar engine (xgrammar, strict mode) admits
    only declared keys, and clients rely on it: litellm's `hosted_vllm/` provider strips
    `additionalProperties` from every tool, and pydantic's schemas never set it. The output is
    still valid under the schema as written (a subset of what it admits). Members of `allOf`
    are not closed alone: each would forbid the others' keys.
    """
    if isinstance(schema, list):
        return [closed_objects(s, close) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    # Keywords sorted (one cache entry for equal schemas); properties keep their order.
    for key, value in sorted(schema.items()):
        if key in _ONE_SCHEMA:
            out[key] = closed_objects(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [closed_objects(s, key != "allOf") for s in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(s) for name, s in value.items()}
        else:
            out[key] = value
    if close and "properties" in out and "allOf" not in out and not _OPEN_KEYS & out.keys():
        out["additionalProperties"] = False
        out = dict(sorted(out.items()))
    return out


@lru_cache(maxsize=256)
def _grammar_text(kind: str, value, compact: bool) -> str:
    matcher = _llguidance().LLMatcher
    if kind in ("json", "json_object"):
        overrides = {"whitespace_flexible": False} if compact else None
        return matcher.grammar_from_json_schema(value, overrides=overrides)
    if kind == "regex":
        return matcher.grammar_from_regex(value)
    if kind == "choice":
        # Lark accepts JSON string literals, so json.dumps quotes any text safely.
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(value)))
    from llguidance.gbnf_to_lark import any_to_lark  # GBNF (llama.cpp, xgrammar) or Lark

    return matcher.grammar_from_lark(any_to_lark(value))


def validate(params: SamplingParams) -> None:
    """Raise ValueError naming the problem if the request's grammar cannot be built."""
    so = params.structured_outputs
    if so is None:
        return
    ll = _llguidance()
    try:
        grammar = grammar_text(so)
        error = ll.LLMatcher.validate_grammar(grammar)
    except Exception as exc:  # noqa: BLE001 - any failure to build it is the client's input
        raise ValueError(f"structured_outputs.{so.kind} is invalid: {exc}"[:2000]) from None
    if error:
        raise ValueError(f"structured_outputs.{so.kind} is invalid: {error.strip()}"[:2000])


def token_ids_bitmask(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 with bit t % 32 of word t // 32 set for each allowed id t."""
    bits = torch.zeros((vocab_size + 31) // 32 * 32, dtype=torch.bool)
    bits[torch.tensor(token_ids, dtype=torch.int64)] = True
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32)
    words = (bits.view(-1, 32).to(torch.int64) * weights).sum(-1)  # in [0, 2**32)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same bits, as int32


def bad_word_bans(bad_words_token_ids: list[list[int]], output_ids: list[int]) -> list[int]:
    """The tokens that would complete a bad word now: a one-token word always; a longer one
    when the output ends with all of it but its last token (vLLM's rule)."""
    bans = []
    for word in bad_words_token_ids:
        prefix = word[:-1]
        if not prefix or output_ids[len(output_ids) - len(prefix):] == prefix:
            bans.append(word[-1])
    return bans


def bad_words_token_ids(tokenizer, bad_words: list[str]) -> list[list[int]]:
    """Each bad word's token ids as it would appear first in the text and after a space (two
    different token sequences in BPE vocabularies), deduplicated (vLLM's rule)."""
    out: list[list[int]] = []
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def ll_tokenizer(hf_tokenizer):
    """llguidance's view of a fast HF tokenizer: the bytes of every token (its trie).

    NOTE: some tokenizers (transformers' GGUF converter's, for SmolLM2, Qwen, GPT-2) give
    byte-level BPE vocabularies the decoder chain [ByteFallback, Fuse, Replace, ByteLevel]; llguidance reads the chain as a
    SentencePiece vocabulary and maps byte tokens to the wrong bytes ('ą' -> b'\xc4\x85'
    instead of b'\x05'), so grammars would admit raw control characters in JSON strings. A
    byte-level pre-tokenizer means the ByteLevel decoder alone is the truth: use it.
    """
    ll = _llguidance()
    backend = copy.copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder, pre = spec.get("decoder") or {}, spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if decoder.get("type") == "Sequence" and any(p.get("type") == "ByteLevel" for p in pres):
        byte_level = [d for d in decoder["decoders"] if d.get("type") == "ByteLevel"]
        if byte_level:
            spec["decoder"] = byte_level[0]
    return ll.LLTokenizer(json.dumps(spec), eos_token=hf_tokenizer.eos_token_id)


class StructuredOutputManager:
    """Builds matchers off the step loop and fills bitmask rows for the sampler."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size  # the logits' width (the model's vocabulary)
        self._ll_tokenizer = None
        self._pool: ThreadPoolExecutor | None = None
        self._executor = None  # llguidance.LLExecutor: masks of a step's rows in parallel

    def set_tokenizer(self, tokenizer) -> None:
        """Reuse a tokenizer the caller already holds (offline LLM: saves loading it again)."""
        self._load_tokenizer = lambda: tokenizer

    def compile(self, params: SamplingParams) -> Future:
        """A future of the request's first matcher (llguidance.LLMatcher)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-grammar")
        return self._pool.submit(self._matcher, params.structured_outputs)

    def _matcher(self, so: StructuredOutputsParams):
        ll = _llguidance()
        if self._ll_tokenizer is None:
            self._ll_tokenizer = ll_tokenizer(self._load_tokenizer())
            logger.info("structured output: llguidance tokenizer ready (%d tokens)",
                        self._ll_tokenizer.vocab_size)
        matcher = ll.LLMatcher(self._ll_tokenizer, grammar_text(so))
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{so.kind} is invalid: {matcher.get_error()}")
        return matcher

    def token_bitmask(self, matchers: list, allowed: list[torch.Tensor | None]) -> torch.Tensor:
        """[M, ceil(V / 32)] int32 for M constrained rows: row k's matcher mask (all ones when
        it has none) ANDed with its allowed_token_ids mask (when it has one)."""
        num_words = (self.vocab_size + 31) // 32
        mask = torch.full((len(matchers), num_words), -1, dtype=torch.int32)
        with_matcher = [(m, k) for k, m in enumerate(matchers) if m is not None]
        if with_matcher and self._ll_words() == num_words:
            # The usual case: the matchers write their rows of the final mask themselves.
            self._compute_masks(with_matcher, mask)
        elif with_matcher:
            rows = [k for _, k in with_matcher]
            mask[rows] = self.fill_bitmask([m for m, _ in with_matcher])
        for k, words in enumerate(allowed):
            if words is not None:
                mask[k] &= words
        return mask

    def _ll_words(self) -> int:
        return (self._ll_tokenizer.vocab_size + 31) // 32

    def _compute_masks(self, matchers: list[tuple[object, int]], mask: torch.Tensor) -> None:
        """Matcher m writes row k of ``mask`` ([B, ll_words] int32, contiguous), for each
        (m, k). llguidance's executor computes the rows in parallel, outside the GIL, on as
        many threads as torch runs (the model is idle meanwhile: these steps are synchronous).
        NOTE: llguidance.torch's helper does exactly this, but importing it runs a
        torch.compile decorator (seconds of torch._dynamo import inside the step loop)."""
        assert mask.dtype == torch.int32 and mask.is_contiguous() and not mask.is_cuda
        assert mask.shape[1] == self._ll_words()
        if self._executor is None:
            self._executor = _llguidance().LLExecutor(max(1, torch.get_num_threads()))
        self._executor.unsafe_compute_mask_ptr(matchers, mask.data_ptr(), mask.shape[1] * 4,
                                               mask.shape[0])

    def fill_bitmask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32: each matcher's allowed next tokens. Ids past the
        tokenizer's vocabulary (padding rows of the embedding) are never allowed."""
        num_words = (self.vocab_size + 31) // 32
        ll_words = self._ll_words()
        mask = torch.zeros(len(matchers), ll_words, dtype=torch.int32)
        self._compute_masks([(m, i) for i, m in enumerate(matchers)], mask)
        if ll_words == num_words:
            return mask
        out = torch.zeros(len(matchers), num_words, dtype=torch.int32)
        width = min(num_words, ll_words)
        out[:, :width] = mask[:, :width]
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
