"""Sequences and sequence groups: the scheduler's view of a request (no torch here)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED
}
_FINISH_REASON = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


PLACEHOLDER_TOKEN_ID = -1


class Sequence:
    """One token stream. KV for token_ids[:num_computed_tokens] is in the cache.

    A step feeds token_ids[num_computed_tokens : num_computed_tokens + n]; when that reaches the
    end of token_ids the model's last logits yield the next token. Preemption by recompute
    resets num_computed_tokens to 0 (prompt and outputs are re-fed as one prefill).

    Async scheduling plans step N+1 while step N still runs on the device, so a sequence may
    end in output placeholders: tokens that were sampled on the device but not yet read back.
    They count as tokens for scheduling (the next step feeds them from device memory) and are
    resolved, in order, when their step's results arrive:

        token_ids  [ prompt ... | outputs read back ... | PH (step N) | PH (step N+1) ]
                                                          ^ resolved next
    """

    __slots__ = (
        "seq_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "status",
        "block_hashes", "cumulative_logprob", "logprobs", "stop_reason", "data",
        "num_output_placeholders", "cache_salt", "max_num_tokens",
    )

    def __init__(
        self, seq_id: int, prompt_token_ids: list[int], cache_salt: str | None = None
    ) -> None:
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.block_hashes: list = []  # chained hashes of full blocks, filled by BlockManager
        self.cumulative_logprob = 0.0
        self.logprobs: list[Any] = []
        self.stop_reason: int | str | None = None
        self.data: Any = None  # engine-side state (detokenizer, generator); opaque here
        self.num_output_placeholders = 0  # trailing tokens still on the device (see above)
        # Enters the first block's prefix-cache hash: only equal salts share cached blocks.
        self.cache_salt = cache_salt
        # Prompt + max_tokens, set by its SequenceGroup: the final length when the request runs
        # to max_tokens (a replay with ignore_eos). Orca's allocators reserve by it; the KV
        # memory accounting tells reserved slots from fragmentation by it.
        self.max_num_tokens = len(prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far, placeholders included (what the next sample comes after)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values are on the host (everything but the placeholders)."""
        return len(self.token_ids) - self.num_output_placeholders

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_known_tokens]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def fork(self, seq_id: int) -> Sequence:
        """A copy with a new id (the caller shares the KV blocks through BlockManager.fork)."""
        child = Sequence(seq_id, self.prompt_token_ids, self.cache_salt)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.block_hashes = list(self.block_hashes)
        child.num_output_placeholders = self.num_output_placeholders
        child.max_num_tokens = self.max_num_tokens
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = list(self.logprobs)
        return child

    def append_token(self, token_id: int, logprob: float = 0.0) -> None:
        assert not self.num_output_placeholders, "resolve the placeholders first"
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob

    def append_placeholder(self) -> None:
        self.token_ids.append(PLACEHOLDER_TOKEN_ID)
        self.num_output_placeholders += 1

    def resolve_placeholder(self, token_id: int, logprob: float = 0.0) -> None:
        """The oldest placeholder's value has arrived."""
        assert self.num_output_placeholders > 0
        i = len(self.token_ids) - self.num_output_placeholders
        self.token_ids[i] = token_id
        self.num_output_placeholders -= 1
        self.cumulative_logprob += logprob

    def drop_placeholders(self) -> None:
        """A finished sequence forgets the tokens a later step sampled after its end."""
        if self.num_output_placeholders:
            del self.token_ids[-self.num_output_placeholders:]
            self.num_output_placeholders = 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")


@dataclass(eq=False)
class SequenceGroup:
    """A request: one prompt, one or more sequences (n > 1, beams) scheduled all-or-nothing."""

    request_id: str
    seqs: list[Sequence]
    params: Any  # SamplingParams | BeamSearchParams; opaque to core/
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # the priority policy: smaller = more important (vLLM's convention)
    user: str | None = None  # the fair policy's client (the OpenAI `user` field)
    # Set by the sjf policy when the request arrives (core/policy.py).
    predicted_output_len: float | None = None
    arrival_step: int = 0
    prompt: str | None = None
    max_tokens: int = 16  # resolved output budget (params.max_tokens or up to max_model_len)
    # Prompt logprobs need every prompt position computed, so such requests take no prefix hits.
    skip_prefix_cache: bool = False
    # Prompt tokens served from the prefix cache when the prompt was first admitted.
    num_cached_tokens: int = 0
    # Parallel sampling (n > 1): sequences the scheduler forks when the first token is due.
    num_samples: int = 1
    num_preemptions: int = 0  # times the scheduler preempted it (recompute or swap)
    data: Any = None  # engine-side state (metrics timestamps, beam bookkeeping)
    # Tenant isolation: prefix-cache blocks are shared only among requests with an equal salt
    # (None shares with None). Pass it to the constructor, which copies it onto the sequences
    # (the block manager reads Sequence.cache_salt); assigning it later does not reach them.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        for seq in self.seqs:
            seq.max_num_tokens = seq.num_prompt_tokens + self.max_tokens
            if seq.cache_salt != self.cache_salt:
                assert seq.cache_salt is None, "sequence salted for another group"
                assert not seq.block_hashes, "salt must be set before any block is hashed"
                seq.cache_salt = self.cache_salt

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def has_placeholders(self) -> bool:
        return any(s.num_output_placeholders for s in self.seqs)

    @property
    def is_done(self) -> bool:
        """Finished, and every sampled token read back (async scheduling finishes a sequence
        by length when its last step is launched, before that token arrives)."""
        return self.is_finished and not self.has_placeholders()
