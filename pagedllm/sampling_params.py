"""Per-request decoding settings, with vLLM's field names and defaults.

Values are checked once, here, so the sampler and the engine can trust them: every bad value
raises ``ValueError`` naming the field and the range it must lie in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import IntEnum

# Below this temperature a request is sampled greedily (vLLM uses the same cut-off): dividing
# logits by ~0 would overflow, and argmax is what such a temperature means anyway.
_GREEDY_EPS = 1e-5

# At most this many sequences per request (n, beam_width): each one holds its own KV blocks and
# sampler row, so an unbounded n lets one request take the whole cache (n=1024: +835 MiB).
MAX_N = 128

# Sequence i of a seeded request draws from torch.Generator(seed + i); the generator takes a
# 64-bit seed, so seed + i must stay in int64 for every i < MAX_N.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - MAX_N

# The sampler works in float32. A repetition penalty p divides positive logits by p and
# multiplies negative ones: below 1e-2 they overflow to inf (1e-45 even rounds to 0) and the
# row's softmax is NaN; above 1e2 it already means "never repeat". vLLM only asks for p > 0.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2

# Float32's largest finite value: a larger temperature becomes inf, and -inf / inf is NaN.
_FP32_MAX = 3.4028234663852886e38


class RequestOutputKind(IntEnum):
    """Which RequestOutputs a request gets (vLLM's names): CUMULATIVE, one per step with
    everything so far (streaming); FINAL_ONLY, just the finished one (offline generate, which
    then skips building per-step outputs)."""

    CUMULATIVE = 0
    FINAL_ONLY = 2


# logit_bias values are clamped to this range by OpenAI; we reject values outside it.
MAX_LOGIT_BIAS = 100.0


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on the output, enforced by a grammar engine (engine/structured_output.py):
    exactly one of a JSON Schema (a dict or its JSON text), a regular expression, a list of
    choices, a grammar (Lark, or GBNF with ``::=``), or ``json_object`` (any JSON object).
    ``disable_any_whitespace`` makes JSON compact (no whitespace between tokens): small models
    otherwise may emit whitespace until max_tokens. vLLM's name and fields;
    ``GuidedDecodingParams`` is its older name."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        _check(len(kinds) == 1, "structured_outputs needs exactly one of json, regex, choice, "
               f"grammar, json_object; got {kinds or 'none'}")
        _check(self.regex is None or isinstance(self.regex, str), "regex must be a string")
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar),
               "grammar must be a non-empty string")
        _check(self.choice is None or (isinstance(self.choice, list) and self.choice
                                       and all(isinstance(c, str) and c for c in self.choice)),
               "choice must be a non-empty list of non-empty strings")
        _check(self.json is None or isinstance(self.json, (str, dict)),
               "json must be a JSON Schema: a dict or its JSON text")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))


GuidedDecodingParams = StructuredOutputsParams


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    ``top_k`` 0 or -1 disables top-k (stored as 0). ``max_tokens=None`` means "up to the
    model's context length"; the engine resolves it. ``logprobs=k`` asks for the sampled
    token's logprob plus the ``k`` most likely tokens at each step (``0``: the sampled one only);
    ``prompt_logprobs`` is the same for every prompt position. ``best_of`` > ``n`` samples
    ``best_of`` sequences and returns the ``n`` with the highest cumulative logprob, as the
    paper's engine (vLLM v0) did; the choice is known only at the end, so such a request
    reports only its final output.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Logits shaping (vLLM's fields): bias added to token ids' logits, the only ids allowed,
    # words that must not appear (each as it tokenizes with and without a leading space).
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Set by the frontend (RequestValidator), which holds the tokenizer: bad_words as ids.
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        # Normalize first so validation sees one spelling of each value.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:
            self.logit_bias = {int(k) if isinstance(k, str) and k.isdigit() else k: v
                               for k, v in self.logit_bias.items()}
        self._validate()
        if self.is_greedy:
            # Truncation is meaningless under argmax; resetting it keeps greedy rows off the
            # sampler's masking path.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        _check(
            _is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}"
        )
        _check(
            _is_real(self.temperature) and self.temperature >= 0.0,
            f"temperature must be >= 0, got {self.temperature}",
        )
        _check(
            self.temperature <= _FP32_MAX,
            f"temperature must be finite in float32 (<= {_FP32_MAX:.4g}), got {self.temperature}",
        )
        if self.best_of is not None:
            _check(_is_int(self.best_of) and self.n <= self.best_of <= MAX_N,
                   f"best_of must be in [n, {MAX_N}] (n={self.n}), got {self.best_of}")
            _check(self.best_of == self.n or self.temperature >= _GREEDY_EPS,
                   f"best_of > n needs sampling (temperature > 0): greedy samples are all the "
                   f"same, got best_of={self.best_of}, temperature={self.temperature}")
        _check(
            _is_real(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be -1 (disable) or >= 0, got {self.top_k}",
        )
        _check(
            _is_real(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        _check(
            _is_real(self.repetition_penalty)
            and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
            f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_real(value) and -2.0 <= value <= 2.0,
                f"{name} must be in [-2, 2], got {value}",
            )
        _check(
            self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
            f"seed must be None or an int in [-2**63, 2**63 - {MAX_N}] (sequence i draws from "
            f"seed + i, which must fit in int64), got {self.seed}",
        )
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be at least 1, got {self.max_tokens}",
        )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            f"min_tokens must be >= 0, got {self.min_tokens}",
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} > "
                f"max_tokens={self.max_tokens}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and value >= 0),
                f"{name} must be None or >= 0, got {value}",
            )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must not contain empty strings, got {self.stop!r}",
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}",
        )
        _check(
            self.detokenize or not self.stop,
            "stop strings need detokenize=True (they are matched on the decoded text)",
        )
        _check(
            self.output_kind in tuple(RequestOutputKind),
            f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
            f"got {self.output_kind!r}",
        )

        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict) and all(
                _is_int(k) and k >= 0 and _is_real(v) and abs(v) <= MAX_LOGIT_BIAS
                for k, v in self.logit_bias.items()),
                f"logit_bias must map token ids to biases in [-{MAX_LOGIT_BIAS:g}, "
                f"{MAX_LOGIT_BIAS:g}], got {self.logit_bias!r}"[:300])
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                   and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids),
                   "allowed_token_ids must be a non-empty list of token ids")
        if self.bad_words is not None:
            _check(isinstance(self.bad_words, list)
                   and all(isinstance(w, str) and w.strip() for w in self.bad_words),
                   "bad_words must be a list of non-blank strings")
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs must be a StructuredOutputsParams")

    @property
    def picks_best_of(self) -> bool:
        return self.best_of is not None and self.best_of > self.n

    def core_params(self) -> SamplingParams:
        """What the engine core runs: for best_of > n, best_of samples (the n > 1 fork path,
        prompt blocks shared) with the sampled tokens' logprobs, which rank them at the end
        (OutputProcessor keeps the n best), and nothing streamed before that end."""
        if not self.picks_best_of:
            return self
        return dataclasses.replace(
            self, n=self.best_of, best_of=None, logprobs=0 if self.logprobs is None else self.logprobs,
            output_kind=RequestOutputKind.FINAL_ONLY)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def needs_sync_steps(self) -> bool:
        """Penalties read every output token and logprobs are read back with the tokens: such
        requests run without async scheduling (see LLMEngine.step). So do grammars and bad
        words: the next step's mask depends on the token the previous step sampled."""
        return (self.has_penalties or self.logprobs is not None
                or self.prompt_logprobs is not None or self.structured_outputs is not None
                or bool(self.bad_words_token_ids))

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(slots=True)
class BeamSearchParams:
    """Settings for ``LLM.beam_search``: keep ``beam_width`` candidates by cumulative logprob,
    rank finished ones by ``logprob_sum / len ** length_penalty``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(
            _is_int(self.beam_width) and 1 <= self.beam_width <= MAX_N,
            f"beam_width must be in [1, {MAX_N}], got {self.beam_width}",
        )
        _check(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            f"max_tokens must be at least 1, got {self.max_tokens}",
        )
        _check(
            _is_real(self.temperature) and self.temperature >= 0.0,
            f"temperature must be >= 0, got {self.temperature}",
        )
        _check(
            _is_real(self.length_penalty) and math.isfinite(self.length_penalty),
            f"length_penalty must be a finite number, got {self.length_penalty}",
        )


def _is_int(value: object) -> bool:
    # bool is an int subclass; n=True is a bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    # Reject NaN explicitly rather than rely on it failing each comparison.
    return _is_int(value) or (isinstance(value, float) and not math.isnan(value))
