"""The typed messages between the frontend (LLM / AsyncLLM) and the engine core.

    frontend ── EngineCoreRequest | abort | finish_seqs | utility ──▶ engine core
    frontend ◀──────────────── EngineCoreOutputs ──────────────────── engine core

The core speaks token ids only: text, stop strings and RequestOutputs belong to the frontend's
OutputProcessor. Messages are msgspec Structs encoded as msgpack (array-like: no field names
on the wire), so one step's outputs cost microseconds to send, in process or over ZeroMQ.
"""

from __future__ import annotations

import enum

import msgspec

from pagedllm.layers.sampler import TokenLogprobs
from pagedllm.sampling_params import BeamSearchParams, SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A validated request: prompt ids and exactly one of sampling / beam search params."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None = None
    beam_search_params: BeamSearchParams | None = None
    arrival_time: float = 0.0
    priority: int = 0  # the priority policy: smaller = more important (vLLM's)
    cache_salt: str | None = None  # prefix-cache blocks are shared only under equal salts
    user: str | None = None  # the client, for the fair policy (the OpenAI `user` field)


class SeqDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one sequence of a request gained since its last delta."""

    index: int  # position in the request (n > 1: fork order)
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it


class BeamHypothesis(msgspec.Struct, array_like=True, gc=False):
    token_ids: list[int]
    cum_logprob: float
    ended_on_eos: bool


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    seqs: list[SeqDelta] = []
    finished: bool = False
    # New prompt-logprob rows (position 1 on; the frontend prepends None for position 0).
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # the core failed the request (e.g. it can never fit)
    beams: list[BeamHypothesis] | None = None  # beam search: the final hypotheses
    # Admission control: the request is queued (a marker with nothing else), or refused
    # because the waiting queue is full (finished, with `error` saying why).
    admitted: bool = False
    queue_full: bool = False


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    # The core's counters after this step (scheduler queues, KV usage, token totals).
    stats: dict | None = None
    # Utility call replies: (call id, result, error message or None).
    utility: tuple[int, object, str | None] | None = None
    # The core failed for good (an error it cannot pin on one request): the reason.
    dead: str | None = None


class RequestType(enum.IntEnum):
    """First frame of each frontend → core message."""

    ADD = 0
    ABORT = 1  # payload: list[str] request ids
    FINISH_SEQS = 2  # payload: list[(request_id, index)] ended by a stop string
    UTILITY = 3  # payload: (call id, method name, args)
    SHUTDOWN = 4


class MsgpackEncoder:
    def __init__(self) -> None:
        self._enc = msgspec.msgpack.Encoder()

    def encode(self, obj) -> bytes:
        return self._enc.encode(obj)


class MsgpackDecoder:
    def __init__(self, t=None) -> None:
        self._dec = msgspec.msgpack.Decoder(t) if t is not None else msgspec.msgpack.Decoder()

    def decode(self, data: bytes | memoryview):
        return self._dec.decode(data)
