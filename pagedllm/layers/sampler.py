"""Turn the last-position logits of a batch into one token per row.

Order of processing (as in vLLM):

    raw logits ──► logprobs (log_softmax of the RAW logits, only if a row asked)
        │
        ├─ logit_bias                    (added to the request's token ids)
        ├─ token bitmask → -inf          (grammar matchers, allowed_token_ids)
        ├─ banned tokens → -inf          (EOS / stop ids while output < min_tokens, bad_words)
        ├─ repetition penalty            (tokens of prompt + output)
        ├─ frequency / presence penalty  (tokens of output only)
        ├─ greedy rows: argmax
        └─ random rows: / temperature → min_p → top_k → top_p → softmax → sample

Each masking step is a plain function so tests can check exactly which tokens survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.sampling_params import SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs at one position: the chosen token's, its rank (1 = most likely), and the
    ``k`` most likely tokens, most likely first (``k`` = the request's ``logprobs``)."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: dict[int, float]


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask for logprobs


@dataclass(slots=True)
class SamplingMetadata:
    """Per-step tensors for the sampler; every field that no row needs is None, so the
    common cases (all greedy, no penalties) skip whole stages without looking at rows."""

    num_rows: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [N] f32; greedy rows hold 1.0. None if all greedy
    greedy_mask: torch.Tensor | None  # [N] bool; only for batches mixing greedy and random
    top_k: torch.Tensor | None  # [N] i64; 0 = disabled
    top_p: torch.Tensor | None  # [N] f32
    min_p: torch.Tensor | None  # [N] f32
    generators: list[torch.Generator | None]  # [N]; used by random rows only
    seeded_rows: list[int]  # random rows that draw from their own generator
    # Penalties cover only the R rows that have one; other rows are left untouched.
    penalty_rows: torch.Tensor | None  # [R] i64 batch row indices
    repetition_penalty: torch.Tensor | None  # [R] f32
    presence_penalty: torch.Tensor | None  # [R] f32
    frequency_penalty: torch.Tensor | None  # [R] f32
    prompt_token_ids: torch.Tensor | None  # [R, Lp] i64, padded with -1; None if no rep. penalty
    output_token_ids: torch.Tensor | None  # [R, Lo] i64, padded with -1
    banned_rows: torch.Tensor | None  # [B] i64 } logits[banned_rows, banned_token_ids] = -inf
    banned_token_ids: torch.Tensor | None  # [B] i64 }
    num_logprobs: list[int | None]  # [N] the request's `logprobs`
    max_num_logprobs: int | None  # None when no row asked
    bias_rows: torch.Tensor | None = None  # [K] i64 } logits[bias_rows, bias_token_ids]
    bias_token_ids: torch.Tensor | None = None  # [K] i64 }   += bias_values
    bias_values: torch.Tensor | None = None  # [K] f32 }
    bitmask_rows: torch.Tensor | None = None  # [M] i64 rows under token_bitmask; None: all
    token_bitmask: torch.Tensor | None = None  # [M, ceil(V/32)] i32; bit t%32 of word t//32

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        banned_token_ids: list[list[int]] | None,
        device: torch.device | str,
        token_bitmask: tuple[list[int], torch.Tensor] | None = None,
    ) -> SamplingMetadata:
        """One row per sequence that samples this step. ``generators[i]`` is the request's
        seeded generator (on ``device``) or None; ``banned_token_ids[i]`` are ids that row must
        not produce now; ``token_bitmask`` is (rows, host bitmask [M, W]) of the rows limited to
        a set of tokens. Token lists are read only for rows with penalties."""
        n = len(params)
        assert len(generators) == n and len(prompt_token_ids) == n and len(output_token_ids) == n
        assert banned_token_ids is None or len(banned_token_ids) == n
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        def f32(values: list[float]) -> torch.Tensor:
            return to_device(values, torch.float32, device)

        temperature = greedy_mask = top_k = top_p = min_p = None
        if not all_greedy:
            temperature = f32([1.0 if g else p.temperature for p, g in zip(params, greedy)])
            if not all_random:
                greedy_mask = to_device(greedy, torch.bool, device)
            if any(p.top_k > 0 for p in params):
                top_k = to_device([p.top_k for p in params], torch.int64, device)
            if any(p.top_p < 1.0 for p in params):
                top_p = f32([p.top_p for p in params])
            if any(p.min_p > 0.0 for p in params):
                min_p = f32([p.min_p for p in params])
        seeded_rows = [i for i, g in enumerate(generators) if g is not None and not greedy[i]]

        penalty_rows = rep = presence = frequency = prompt_ids = output_ids = None
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if rows:
            penalty_rows = to_device(rows, torch.int64, device)
            rep = f32([params[i].repetition_penalty for i in rows])
            presence = f32([params[i].presence_penalty for i in rows])
            frequency = f32([params[i].frequency_penalty for i in rows])
            output_ids = _pad([output_token_ids[i] for i in rows], device)
            if any(params[i].repetition_penalty != 1.0 for i in rows):
                prompt_ids = _pad([prompt_token_ids[i] for i in rows], device)

        banned_rows = banned_ids = None
        if banned_token_ids is not None and any(banned_token_ids):
            flat_rows = [i for i, ids in enumerate(banned_token_ids) for _ in ids]
            flat_ids = [t for ids in banned_token_ids for t in ids]
            banned_rows = to_device(flat_rows, torch.int64, device)
            banned_ids = to_device(flat_ids, torch.int64, device)

        bias_rows = bias_ids = bias_values = None
        biased = [(i, t, b) for i, p in enumerate(params) if p.logit_bias
                  for t, b in p.logit_bias.items()]
        if biased:
            bias_rows = to_device([r for r, _, _ in biased], torch.int64, device)
            bias_ids = to_device([t for _, t, _ in biased], torch.int64, device)
            bias_values = f32([b for _, _, b in biased])
        bitmask_rows = bitmask = None
        if token_bitmask is not None:
            # None: every row, in order (a batch of constrained requests): no gather/scatter.
            if list(token_bitmask[0]) != list(range(n)):
                bitmask_rows = to_device(token_bitmask[0], torch.int64, device)
            bitmask = token_bitmask[1].to(device)

        num_logprobs = [p.logprobs for p in params]
        max_num_logprobs = max((k for k in num_logprobs if k is not None), default=None)
        return cls(
            num_rows=n,
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=temperature,
            greedy_mask=greedy_mask,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators=list(generators),
            seeded_rows=seeded_rows,
            penalty_rows=penalty_rows,
            repetition_penalty=rep,
            presence_penalty=presence,
            frequency_penalty=frequency,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            banned_rows=banned_rows,
            banned_token_ids=banned_ids,
            num_logprobs=num_logprobs,
            max_num_logprobs=max_num_logprobs,
            bias_rows=bias_rows,
            bias_token_ids=bias_ids,
            bias_values=bias_values,
            bitmask_rows=bitmask_rows,
            token_bitmask=bitmask,
        )


class Sampler(nn.Module):
    """``forward(logits [N, V], meta) -> SamplerOutput``. Never modifies ``logits`` in place."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        sampled, raw_logprobs = self.sample(logits, meta)
        token_ids = sampled.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_ids, [None] * meta.num_rows)
        return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, sampled, meta.num_logprobs))

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device side: sampled ids [N] and, if a row asked, raw logprobs [N, V]. Nothing
        here waits for the device, so an async step can queue the next step behind it."""
        assert logits.dim() == 2 and logits.shape[0] == meta.num_rows, logits.shape
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            # vLLM v1's default: logprobs describe the model, not the sampling transforms.
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if meta.bias_rows is not None:
            logits = logits.clone()
            logits.index_put_((meta.bias_rows, meta.bias_token_ids), meta.bias_values,
                              accumulate=True)
        if meta.token_bitmask is not None:  # a new tensor: the model's logits stay as they are
            logits = apply_token_bitmask(logits, meta.bitmask_rows, meta.token_bitmask)
        if meta.banned_rows is not None or meta.penalty_rows is not None:
            logits = apply_penalties(logits.clone(), meta)

        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)  # the benchmark hot path: one kernel, no row loop
        else:
            sampled = random_sample(self.compute_probs(logits, meta), meta)
            if not meta.all_random:
                sampled = torch.where(meta.greedy_mask, logits.argmax(dim=-1), sampled)
        return sampled, raw_logprobs

    @staticmethod
    def compute_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution random rows sample from: penalised ``logits`` → temperature →
        min_p → top_k → top_p → softmax. Masked tokens get probability exactly 0."""
        assert meta.temperature is not None, "all-greedy batches have no distribution"
        logits = logits / meta.temperature.unsqueeze(1)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        return logits.softmax(dim=-1)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Banned tokens, then repetition, frequency and presence penalties, IN PLACE on ``logits``
    (the sampler passes a copy). Rows without penalties are not touched."""
    if meta.banned_rows is not None:
        logits[meta.banned_rows, meta.banned_token_ids] = float("-inf")
    if meta.penalty_rows is None:
        return logits
    rows = meta.penalty_rows
    sub = logits[rows]  # [R, V] (a copy: advanced indexing)
    vocab_size = sub.shape[1]
    counts = _count_tokens(meta.output_token_ids, vocab_size)  # [R, V] f32
    if meta.prompt_token_ids is not None:
        seen = (counts > 0) | (_count_tokens(meta.prompt_token_ids, vocab_size) > 0)
        rep = meta.repetition_penalty.unsqueeze(1)
        # Divide positive logits and multiply negative ones, so a penalty > 1 always lowers
        # the token's probability (dividing a negative logit would raise it).
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
    sub = (
        sub
        - meta.frequency_penalty.unsqueeze(1) * counts
        - meta.presence_penalty.unsqueeze(1) * (counts > 0).float()
    )
    logits[rows] = sub
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor
                        ) -> torch.Tensor:
    """A copy of ``logits`` with ``[rows[i], t] = -inf`` unless bit ``t % 32`` of
    ``bitmask[i, t // 32]`` is set (llguidance's and xgrammar's layout); ``rows`` None means
    every row in order. Token ids past the mask are disallowed. The torch path on every
    device: one unpack and one masked write, no per-row loop."""
    num_rows, vocab_size = logits.shape
    # NOTE: the int32 words read as bytes, low byte first (every device torch runs on is
    # little-endian): byte j of word w holds tokens 32w + 8j .. 32w + 8j + 7, bit b token + b.
    # Unpacking bytes moves a quarter of the data that shifting int32 words would.
    words = bitmask.contiguous().view(torch.uint8)
    bits = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=bitmask.device)
    banned = ((words.unsqueeze(-1) & bits) == 0).reshape(bitmask.shape[0], -1)
    if banned.shape[1] < vocab_size:
        banned = torch.nn.functional.pad(banned, (0, vocab_size - banned.shape[1]), value=True)
    banned = banned[:, :vocab_size]
    if rows is None:  # every row: one pass, no gather or scatter
        assert banned.shape[0] == num_rows, (banned.shape, num_rows)
        return logits.masked_fill(banned, float("-inf"))
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(banned, float("-inf"))
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p[row] * (top probability of row)``."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (0 = all; ties with the k-th are kept), then
    the smallest set of most likely tokens whose probability sums to at least ``top_p``.
    One ascending sort serves both masks."""
    if top_p is None:
        return apply_top_k(logits, top_k)
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: most likely token is last
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)
        kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token goes if it and everything less likely carry at most 1 - top_p of the mass,
    # i.e. the tokens above it already reach top_p.
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor | None) -> torch.Tensor:
    """Top-k alone, through ``topk(max k)`` rather than a full sort of the vocabulary (a
    49k-wide sort is the slowest step of CPU sampling). Same result as the sort path."""
    if top_k is None:
        return logits
    vocab_size = logits.shape[1]
    enabled = (top_k > 0) & (top_k < vocab_size)
    k = torch.where(enabled, top_k, 1)
    k_max = int(k.max())  # a host sync, but topk needs a Python int
    kth_largest = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth_largest = kth_largest.masked_fill(~enabled.unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def random_sample(probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Sample one token per row as ``argmax(probs / q)``, ``q ~ Exp(1)`` i.i.d. (the
    exponential race: ``P(argmax = j) = probs[j]``). Seeded rows draw their whole ``q`` row
    from their own generator, so their tokens do not depend on the rest of the batch."""
    u = torch.empty_like(probs)
    if len(meta.seeded_rows) < meta.num_rows:
        u.uniform_()
    for i in meta.seeded_rows:
        u[i].uniform_(generator=meta.generators[i])
    # q = -log(u) with u in [0, 1) lies in (0, inf]: never 0, so a masked token's 0 / q stays
    # 0 (a 0 / 0 NaN would win the argmax). On CPU this is ~4x faster than exponential_().
    q = u.log_().neg_()
    return (probs / q).argmax(dim=-1)


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, k: int
) -> list[TokenLogprobs]:
    """Logprobs for ``prompt_logprobs``: ``logits[t]`` (raw, [T, V]) scores
    ``next_token_ids[t]`` (the prompt token at position t + 1). Returns T entries; the
    caller prepends None for the first prompt token, which nothing predicts."""
    assert logits.dim() == 2 and next_token_ids.shape == (logits.shape[0],)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _gather_logprobs(logprobs, next_token_ids.to(logits.device), [k] * logits.shape[0])


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int | None]
) -> list[TokenLogprobs | None]:
    token_lp = logprobs.gather(1, token_ids.long().unsqueeze(1))  # [N, 1]
    ranks = (logprobs > token_lp).sum(dim=-1) + 1
    k_max = max((k for k in num_logprobs if k is not None), default=0)
    top_vals: list[list[float]] = [[] for _ in num_logprobs]
    top_ids: list[list[int]] = [[] for _ in num_logprobs]
    if k_max > 0:
        vals, ids = logprobs.topk(min(k_max, logprobs.shape[1]), dim=-1)  # descending
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out: list[TokenLogprobs | None] = []
    rows = zip(
        num_logprobs,
        token_ids.tolist(),
        token_lp.squeeze(1).tolist(),
        ranks.tolist(),
        top_ids,
        top_vals,
    )
    for k, tok, lp, rank, ids_row, vals_row in rows:
        if k is None:
            out.append(None)
        else:
            out.append(TokenLogprobs(tok, lp, rank, dict(zip(ids_row[:k], vals_row[:k]))))
    return out


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as a device tensor without a stream sync (torch.tensor(..., device=cuda)
    waits for the device, which would stall async scheduling behind the step in flight)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _pad(rows: list[list[int]], device: torch.device | str) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [r + [-1] * (width - len(r)) for r in rows]
    return to_device(padded, torch.int64, device).reshape(len(rows), width)


def _count_tokens(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, L] ids padded with -1 → [R, V] occurrence counts (f32)."""
    # Padding lands in an extra column V that is cut off afterwards.
    idx = torch.where(ids < 0, vocab_size, ids)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts[:, :vocab_size]
