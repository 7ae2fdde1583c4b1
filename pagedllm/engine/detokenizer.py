"""Incremental detokenization and stop-string matching for one output sequence.

Decoding token by token and concatenating is wrong in two ways: a multi-byte character can
span several byte-level tokens (each alone decodes to "\ufffd"), and SentencePiece decoders
drop the leading space of the first token they see. So each step decodes a short window
instead, and keeps only the text the newest tokens add to it:

    ids:   ... | prefix_offset ......... read_offset ......... len(ids)
                 [ text already emitted ) [ text not yet emitted )
    new text = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

The window restarts after every emission, so each call costs O(new tokens), and text waits
while it ends in "\ufffd" (an incomplete character).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagedllm.sampling_params import SamplingParams

# Prompt tokens that seed the first window, so the first output token decodes the way it
# would after the prompt (e.g. SentencePiece keeps its leading space, as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Keeps ``output_text`` equal to the decoded output ids (minus what a stop string cuts).

    ``append(new_ids)`` returns the stop string that finished the sequence, or None;
    ``get_delta(finished)`` returns the text to stream since the last call. Stop strings are
    ignored until ``min_tokens`` tokens exist (vLLM's rule). For byte-level BPE tokenizers
    (GPT-2, Llama 3, Qwen2, SmolLM2) the final text equals ``tokenizer.decode(output_ids)``.
    """

    __slots__ = (
        "params",
        "output_text",
        "stop_reason",
        "num_output_tokens",
        "_decode",
        "_ids",
        "_read_offset",
        "_prefix_text",
        "_sent_offset",
        "_flushed",
    )

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.output_text = ""
        self.stop_reason: str | None = None
        self.num_output_tokens = 0
        self._sent_offset = 0  # chars of output_text already returned by get_delta
        self._flushed = False
        # The window: ids[0] is at prefix_offset (older ids are dropped), ids[_read_offset]
        # is the first id whose text is not emitted yet; _prefix_text = decode(ids[:read]).
        self._ids: list[int] = []
        self._read_offset = 0
        self._prefix_text = ""
        if not params.detokenize:
            return
        self._decode = _decoder(tokenizer, params)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context) if context else ""
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends mid-character; its tail bytes would merge with the output's.
            context, context_text = [], ""
        self._ids = context
        self._read_offset = len(context)
        self._prefix_text = context_text

    def append(self, new_token_ids: list[int]) -> str | None:
        """Add newly sampled ids; returns the matched stop string (text is then final)."""
        self.num_output_tokens += len(new_token_ids)
        if not self.params.detokenize or self.stop_reason is not None:
            return None
        self._ids.extend(new_token_ids)
        old_len = len(self.output_text)
        if not self._advance(final=False):
            return None
        if self.num_output_tokens < self.params.min_tokens:
            return None
        return self._check_stop(old_len)

    def finish(self) -> None:
        """Emit text held back as an incomplete character (it decodes to "\ufffd", as a full
        decode would). Idempotent; ``get_delta(finished=True)`` calls it."""
        if self._flushed or not self.params.detokenize or self.stop_reason is not None:
            return
        self._flushed = True
        old_len = len(self.output_text)
        if self._advance(final=True) and self.num_output_tokens >= self.params.min_tokens:
            self._check_stop(old_len)

    def get_delta(self, finished: bool) -> str:
        """Text to stream since the last call. While unfinished, holds back the longest
        suffix that is the start of a stop string, so a stop string never leaks; the deltas
        concatenate to the final ``output_text``."""
        if finished:
            self.finish()
        end = len(self.output_text)
        if not finished and self.stop_reason is None and not self.params.include_stop_str_in_output:
            end -= self._stop_prefix_len()
        if end <= self._sent_offset:
            return ""
        delta = self.output_text[self._sent_offset : end]
        self._sent_offset = end
        return delta

    def _advance(self, final: bool) -> bool:
        """Decode the window; append its new text unless it ends mid-character (or ``final``)."""
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT_CHAR) and not final):
            return False
        self.output_text += text[len(self._prefix_text) :]
        # Restart the window at the tokens just emitted: they are the context the next
        # tokens decode against. Dropping older ids keeps memory and decode cost flat.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        # NOTE: not text[len(old prefix):]: a SentencePiece decode of these ids alone drops
        # a leading space, and the next subtraction must drop it too.
        self._prefix_text = self._decode(self._ids)
        return True

    def _check_stop(self, old_len: int) -> str | None:
        """Find the earliest stop string that ends in the new text; cut the text there."""
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            # Only a match that ends inside the new text is new: start len(stop)-1 chars back.
            idx = text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.output_text = text[:end]
        self.stop_reason = stop
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of output_text that is a proper prefix of a stop."""
        text, held = self.output_text, 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held


def _decoder(tokenizer: Any, params: SamplingParams) -> Callable[[list[int]], str]:
    skip = params.skip_special_tokens
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Fast tokenizers: call the Rust decoder directly (~4x cheaper than
        # tokenizer.decode). This skips transformers' optional clean-up of spaces before
        # punctuation, which is window-dependent (not incremental-safe) and which
        # transformers 5 ignores for BPE tokenizers anyway.
        return lambda ids: backend.decode(ids, skip_special_tokens=skip)
    spaces = params.spaces_between_special_tokens
    return lambda ids: tokenizer.decode(
        ids,
        skip_special_tokens=skip,
        spaces_between_special_tokens=spaces,
        clean_up_tokenization_spaces=False,
    )
