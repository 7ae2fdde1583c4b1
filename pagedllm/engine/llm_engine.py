"""LLMEngine: the synchronous frontend. add_request -> step() -> RequestOutputs.

    prompt text ── tokenizer, validation ──▶ EngineCoreRequest ──▶ client ──▶ EngineCore
    RequestOutput ◀── OutputProcessor (detokenize, stop strings) ◀── EngineCoreOutputs

The core runs in this thread (`engine_core="inproc"`, the default offline: no IPC), or in its
own process (`"process"`) or a thread (`"thread"`) behind ZeroMQ (engine/core_client.py).
Every path gives the same tokens.
"""

from __future__ import annotations

import logging
import time

from pagedllm.config import EngineConfig, check_kv_allocator
from pagedllm.engine import structured_output
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core_client import EngineDeadError, InprocClient, SyncMPClient
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("pagedllm")

ENGINE_CORE_PLACEMENTS = ("inproc", "process", "thread")

__all__ = ["EngineDeadError", "LLMEngine", "RequestValidator", "eos_token_ids"]


class RequestValidator:
    """Checks a request at the door against the engine's real limits (shared by LLMEngine and
    AsyncLLM): bad input raises ValueError naming what is wrong, and nothing is queued."""

    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.model.max_model_len
        self.vocab_size = config.model.hf_config.vocab_size

    def prompt_ids(self, prompt: str | None, prompt_token_ids=None) -> list[int]:
        """The prompt's token ids (encoding the text if no ids are given), validated."""
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt + at least one generated token); "
                "shorten the prompt or raise max_model_len")
        bad = next((t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_sampling(self, params: SamplingParams) -> SamplingParams:
        """The fields SamplingParams cannot check alone: those that index the logits, whose
        bound is this model's vocabulary (an id past it would fail inside the engine core)."""
        vocab = self.vocab_size
        if params.top_k > vocab:  # NOTE: rejected, not clamped, so a typo is not silently "off"
            raise ValueError(f"top_k must be -1 (disable) or in [1, {vocab}] (the vocabulary "
                             f"size), got {params.top_k}")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids must lie in the vocabulary [0, {vocab}), got {bad}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > vocab:
                raise ValueError(f"{name} must be at most the vocabulary size {vocab}, "
                                 f"got {value}")
        for name in ("logit_bias", "allowed_token_ids"):
            bad = next((t for t in getattr(params, name) or () if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{name} must hold token ids in the vocabulary [0, {vocab}), "
                                 f"got {bad}")
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = structured_output.bad_words_token_ids(
                self.tokenizer, params.bad_words)
        structured_output.validate(params)
        return params

    def make_request(self, request_id: str, prompt: str | None, params, prompt_token_ids=None,
                     priority: int = 0, arrival_time: float | None = None,
                     cache_salt: str | None = None, user: str | None = None
                     ) -> EngineCoreRequest:
        self.check_scheduling(priority, user)
        ids = self.prompt_ids(prompt, prompt_token_ids)
        sampling = beam = None
        if isinstance(params, SamplingParams):
            # best_of > n: the core samples best_of; the OutputProcessor keeps the n best.
            sampling = self.check_sampling(params).core_params()
        elif isinstance(params, BeamSearchParams):
            beam = params
        else:
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        check_kv_allocator(self.config, sampling.n if sampling else 1, beam is not None)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError("cache_salt must be a non-empty string")
        return EngineCoreRequest(str(request_id), ids, sampling, beam,
                                 arrival_time or time.monotonic(), priority, cache_salt, user)

    def check_scheduling(self, priority, user) -> None:
        """A priority only means something under the priority policy: elsewhere it is an error
        (as vLLM's), not ignored. `user` is OpenAI's end-user id, accepted under any policy
        (the fair one schedules by it)."""
        if not isinstance(priority, int) or isinstance(priority, bool) \
                or not -2**63 <= priority < 2**63:
            raise ValueError(f"priority must be an int in int64's range, got {priority!r}")
        policy = self.config.scheduler.policy
        if priority != 0 and policy != "priority":
            raise ValueError(f"got priority {priority} but the scheduling policy is {policy!r}; "
                             "start the engine with scheduling_policy='priority' "
                             "(--scheduling-policy priority)")
        if user is not None and not isinstance(user, str):
            raise ValueError(f"user must be a string, got {type(user).__name__}")


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer, engine_core: str = "inproc") -> None:
        if engine_core not in ENGINE_CORE_PLACEMENTS:
            raise ValueError(f"engine_core must be one of {ENGINE_CORE_PLACEMENTS}, "
                             f"got {engine_core!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.validator = RequestValidator(config, tokenizer)
        self.max_model_len = config.model.max_model_len
        self.vocab_size = config.model.hf_config.vocab_size
        self.eos_token_ids = eos_token_ids(tokenizer, config.model.hf_config)
        self.output_processor = OutputProcessor(tokenizer)
        self.client = (InprocClient(config, self.eos_token_ids) if engine_core == "inproc"
                       else SyncMPClient(config, self.eos_token_ids, placement=engine_core))
        if engine_core == "inproc":  # the core's grammar engine needs no second tokenizer
            self.client.core.structured_output.set_tokenizer(tokenizer)
        self.stats = {"num_requests_finished_total": 0}

    @classmethod
    def from_engine_args(cls, args: EngineArgs, engine_core: str = "inproc") -> LLMEngine:
        from pagedllm.loader import load_tokenizer

        config = args.create_engine_config()
        tokenizer = load_tokenizer(config.model.model, config.model.load_format)
        return cls(config, tokenizer, engine_core)

    @property
    def engine_core(self):
        """The EngineCore itself, when it runs in this thread (tests look inside it)."""
        if not isinstance(self.client, InprocClient):
            raise AttributeError("the engine core runs in another process or thread; use "
                                 "check_integrity() / get_metrics()")
        return self.client.core

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None,
                    params: SamplingParams | BeamSearchParams,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None, cache_salt: str | None = None,
                    user: str | None = None) -> None:
        """Validate and queue a request. Bad input raises ValueError and changes nothing.
        Requests with different `cache_salt` never share prefix-cache blocks. `priority` (the
        priority policy: smaller runs first) and `user` (the fair policy's client) steer the
        scheduler."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.validator.make_request(request_id, prompt, params, prompt_token_ids,
                                          priority, arrival_time, cache_salt, user)
        self.client.add_request(req)  # in process, the core's own checks raise here
        self.output_processor.add_request(req, prompt, params)

    def add_beam_search_request(self, request_id: str, prompt: str | None,
                                params: BeamSearchParams,
                                prompt_token_ids: list[int] | None = None) -> None:
        """Queue a beam search: one request whose sequences are the live beams."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"expected BeamSearchParams, got {type(params).__name__}")
        self.add_request(request_id, prompt, params, prompt_token_ids)

    def prompt_ids(self, prompt: str | None, prompt_token_ids=None) -> list[int]:
        return self.validator.prompt_ids(prompt, prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown or finished ids are ignored)."""
        self.output_processor.abort_request(request_id)
        self.client.abort_requests([request_id])

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One core step's outputs (in process: runs the step; else: waits for the next)."""
        core_outputs = self.client.get_output()
        processed = self.output_processor.process_outputs(core_outputs.outputs)
        self.client.abort_requests(processed.abort)
        self.client.finish_seqs(processed.finish_seqs)
        self.stats["num_requests_finished_total"] += sum(
            o.finished and o.error is None for o in processed.request_outputs)
        return processed.request_outputs

    # ---- metrics, checks, shutdown -------------------------------------------------------------
    def get_metrics(self) -> dict:
        return {**self.client.call_utility("get_metrics"), **self.stats}

    def check_integrity(self) -> bool:
        """The core's block pool invariants hold (raises if not)."""
        return self.client.call_utility("check_integrity")

    def shutdown(self) -> None:
        self.client.shutdown()


def eos_token_ids(tokenizer, hf_config) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
