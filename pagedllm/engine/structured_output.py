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

__all__ = ["StructuredOutputManager", "bad_word_bans", "bad_words_token_ids", "grammar_text",
           "ll_tokenizer", "token_ids_bitmask", "validate"]


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
        # A canonical key: equal schemas written in a different key order share one entry.
        value = json.dumps(json.loads(value) if isinstance(value, str) else value,
                           sort_keys=True)
    elif so.kind == "choice":
        value = json.dumps(value)
    return _grammar_text(so.kind, value, so.disable_any_whitespace)


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

    NOTE: transformers' GGUF converter gives byte-level BPE vocabularies (SmolLM2, Qwen, GPT-2)
    the decoder chain [ByteFallback, Fuse, Replace, ByteLevel]; llguidance reads the chain as a
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
        mask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        with_matcher = [k for k, m in enumerate(matchers) if m is not None]
        if with_matcher:
            mask[with_matcher] = self.fill_bitmask([matchers[k] for k in with_matcher])
        for k, words in enumerate(allowed):
            if words is not None:
                mask[k] &= words
        return mask

    def fill_bitmask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32: each matcher's allowed next tokens. Ids past the
        tokenizer's vocabulary (padding rows of the embedding) are never allowed."""
        num_words = (self.vocab_size + 31) // 32
        ll_words = (self._ll_tokenizer.vocab_size + 31) // 32
        mask = torch.zeros(len(matchers), ll_words, dtype=torch.int32)
        # NOTE: llguidance.torch's helper does exactly this, but importing it runs a
        # torch.compile decorator (seconds of torch._dynamo import inside the step loop).
        row_bytes = ll_words * 4
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(mask.data_ptr() + i * row_bytes, row_bytes)
        if ll_words == num_words:
            return mask
        out = torch.zeros(len(matchers), num_words, dtype=torch.int32)
        width = min(num_words, ll_words)
        out[:, :width] = mask[:, :width]
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
