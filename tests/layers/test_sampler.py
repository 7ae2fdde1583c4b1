from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
)
from pagedllm.sampling_params import (
    MAX_N, MAX_SEED, BeamSearchParams, SamplingParams, SamplingType,
)

# A hand-built distribution with no ties and no cumulative sum near the top_p values used.
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = torch.tensor(PROBS).log()


def build(params, generators=None, prompts=None, outputs=None, banned=None):
    n = len(params)
    return SamplingMetadata.build(
        params,
        generators if generators is not None else [None] * n,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        banned,
        "cpu",
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(probs_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs_row > 0).flatten().tolist())


# ---------------------------------------------------------------- greedy


def test_all_greedy_is_argmax_and_builds_no_sampling_tensors():
    logits = torch.randn(8, 300, generator=gen(0))
    meta = build([SamplingParams(temperature=0.0)] * 8)
    assert meta.all_greedy and meta.temperature is None and meta.penalty_rows is None
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_mixed_batch_greedy_rows_take_argmax():
    logits = torch.randn(4, 50, generator=gen(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0)] * 2
    argmax = logits.argmax(-1).tolist()
    for _ in range(5):
        ids = Sampler()(logits, build(params)).sampled_token_ids
        assert ids[0] == argmax[0] and ids[2] == argmax[2]


def test_sampler_does_not_modify_input_logits():
    logits = torch.randn(2, 20, generator=gen(2))
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0), SamplingParams()]
    meta = build(params, outputs=[[1, 2], [3]], prompts=[[4], [5]], banned=[[0], [7]])
    Sampler()(logits, meta)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- seeds


def run_steps(row_params, others, position, seed, steps=8, vocab=1000):
    """Sample `steps` times with the seeded row at `position` among unseeded rows."""
    g = gen(seed)
    logits = torch.zeros(len(others) + 1, vocab)  # uniform: any RNG difference shows
    params = list(others)
    params.insert(position, row_params)
    gens = [None] * len(others)
    gens.insert(position, g)
    tokens = []
    for _ in range(steps):
        out = Sampler()(logits, build(params, generators=gens))
        tokens.append(out.sampled_token_ids[position])
    return tokens


def test_seeded_row_is_reproducible_regardless_of_batch():
    p = SamplingParams(temperature=0.8, seed=7)
    alone = run_steps(p, [], 0, seed=7)
    torch.manual_seed(123)  # the unseeded neighbours use the default RNG; vary it
    batched = run_steps(p, [SamplingParams(), SamplingParams(top_k=5)], 2, seed=7)
    torch.manual_seed(999)
    middle = run_steps(p, [SamplingParams(temperature=0.3), SamplingParams()], 1, seed=7)
    assert alone == batched == middle


def test_different_seeds_give_different_tokens():
    p = SamplingParams(seed=1)
    assert run_steps(p, [], 0, seed=1) != run_steps(p, [], 0, seed=2)


def test_two_seeded_rows_in_one_batch_are_independent_of_order():
    logits = torch.zeros(2, 1000)
    p = [SamplingParams(seed=1), SamplingParams(seed=2)]
    a = Sampler()(logits, build(p, generators=[gen(1), gen(2)])).sampled_token_ids
    b = Sampler()(logits, build(p[::-1], generators=[gen(2), gen(1)])).sampled_token_ids
    assert a == b[::-1]


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    n = 20000
    logits = LOGITS.expand(n, -1).contiguous()
    ids = Sampler()(logits, build([SamplingParams()] * n)).sampled_token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=len(PROBS)).float() / n
    # 4 standard errors of the largest-variance bin.
    assert torch.allclose(freq, torch.tensor(PROBS), atol=4 * math.sqrt(0.25 / n))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "kwargs, survivors",
    [
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_k=1), [0]),
        (dict(top_k=100), [0, 1, 2, 3, 4, 5]),  # k > V keeps everything
        (dict(top_k=-1), [0, 1, 2, 3, 4, 5]),
        (dict(top_p=0.7), [0, 1, 2]),  # 0.4 + 0.25 = 0.65 < 0.7 <= 0.80
        (dict(top_p=0.6), [0, 1]),
        (dict(top_p=0.35), [0]),
        (dict(top_p=1e-9), [0]),  # 1 - p rounds to 1.0: the top token must still stay
        (dict(min_p=0.5), [0, 1]),  # threshold 0.2
        (dict(min_p=0.3), [0, 1, 2]),  # threshold 0.12
        (dict(min_p=0.12), [0, 1, 2, 3, 4]),  # threshold 0.048
    ],
)
def test_single_mask_keeps_exactly_the_expected_tokens(kwargs, survivors):
    probs = Sampler.compute_probs(LOGITS.unsqueeze(0), build([SamplingParams(**kwargs)]))[0]
    assert kept(probs) == set(survivors)
    expected = torch.zeros(len(PROBS))
    expected[survivors] = torch.tensor(PROBS)[survivors]
    assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)


def test_masks_apply_in_order_min_p_top_k_top_p():
    # min_p 0.2 keeps 4 tokens (>= 0.08), top_k 3 keeps 3, then over the renormalised
    # [0.5, 0.3125, 0.1875] top_p 0.6 needs 2.
    p = SamplingParams(min_p=0.2, top_k=3, top_p=0.6)
    probs = Sampler.compute_probs(LOGITS.unsqueeze(0), build([p]))[0]
    assert torch.allclose(probs, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65, atol=1e-6)
    # top_p sees the mass left by min_p: 0.65 / 0.9 >= 0.7 keeps 2 tokens; top_p first
    # would keep 3 (0.65 < 0.7 <= 0.8 of the full distribution).
    p = SamplingParams(min_p=0.2, top_p=0.7)
    assert kept(Sampler.compute_probs(LOGITS.unsqueeze(0), build([p]))[0]) == {0, 1}
    # Likewise top_p sees the mass left by top_k: 0.65 / 0.8 >= 0.8 keeps 2, not 3.
    p = SamplingParams(top_k=3, top_p=0.8)
    assert kept(Sampler.compute_probs(LOGITS.unsqueeze(0), build([p]))[0]) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p_exactly():
    # Uniform over 4: every probability is exactly 0.25, so 2 tokens reach 0.5 exactly.
    out = apply_top_k_top_p(torch.zeros(1, 4), None, torch.tensor([0.5]))
    assert int(torch.isfinite(out).sum()) == 2


def test_temperature_scales_logits_before_masks():
    p = SamplingParams(temperature=2.0, min_p=0.5)
    probs = Sampler.compute_probs(LOGITS.unsqueeze(0), build([p]))[0]
    tempered = (LOGITS / 2).softmax(-1)
    # At T=2: probs ∝ sqrt(p); threshold 0.5 * max keeps p_i >= 0.25 * 0.4 = 0.1 → 4 tokens.
    expected = torch.where(tempered >= 0.5 * tempered.max(), tempered, torch.tensor(0.0))
    assert kept(probs) == {0, 1, 2, 3}
    assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)


def test_rows_get_their_own_masks_in_one_batch():
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.7),
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=1),
        SamplingParams(min_p=0.5),
    ]
    probs = Sampler.compute_probs(LOGITS.expand(5, -1), build(params))
    assert [kept(row) for row in probs] == [{0, 1}, {0, 1, 2}, set(range(6)), set(range(6)), {0, 1}]


def test_top_k_only_batch_uses_per_row_k():
    # No top_p in the batch: the topk() path, with a disabled row next to enabled ones.
    params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_k=4)]
    probs = Sampler.compute_probs(LOGITS.expand(3, -1), build(params))
    assert [kept(row) for row in probs] == [{0, 1}, set(range(6)), {0, 1, 2, 3}]


@pytest.mark.parametrize("top_p", [None, torch.tensor([1.0])])  # topk path and sort path
def test_top_k_keeps_ties_with_the_kth_value(top_p):
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2]), top_p)
    assert torch.isinf(out[0, [0, 4]]).all() and torch.equal(out[0, 1:4], logits[0, 1:4])


def test_masked_tokens_are_never_sampled():
    torch.manual_seed(1)
    n = 4000
    params = [SamplingParams(top_k=3, temperature=3.0)] * n  # hot temperature: flat tail
    ids = Sampler()(LOGITS.expand(n, -1), build(params)).sampled_token_ids
    assert set(ids) == {0, 1, 2}


def reference_kept(probs: list[float], k: int, p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if k > 0:
        order = order[:k]
    total = sum(probs[i] for i in order)
    keep, cum = [], 0.0
    for i in order:
        keep.append(i)
        cum += probs[i] / total
        if cum >= p:
            break
    return set(keep)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 1000), min_size=2, max_size=12, unique=True),
    k=st.integers(0, 12),
    p=st.floats(0.05, 1.0),
)
def test_top_k_top_p_matches_reference(weights, k, p):
    probs = [w / sum(weights) for w in weights]
    # Skip cases where float32 rounding could decide a boundary either way.
    order = sorted(probs, reverse=True)[: k or None]
    cums = [sum(order[: i + 1]) / sum(order) for i in range(len(order))]
    if any(abs(c - p) < 1e-5 for c in cums):
        return
    logits = torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)
    out = apply_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p]))
    assert set(torch.nonzero(torch.isfinite(out[0])).flatten().tolist()) == reference_kept(
        probs, k, p
    )
    only_k = apply_top_k_top_p(logits, torch.tensor([k]), None)
    assert set(torch.nonzero(torch.isfinite(only_k[0])).flatten().tolist()) == reference_kept(
        probs, k, 1.0
    )


def test_min_p_function_masks_below_fraction_of_max():
    logits = LOGITS.expand(2, -1)
    out = apply_min_p(logits, torch.tensor([0.5, 0.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False, False, False]
    assert torch.equal(out[1], logits[1])


# ---------------------------------------------------------------- penalties and bans


def test_penalties_follow_the_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalties: row must stay untouched
    ]
    meta = build(params, prompts=[[0, 3], [0]], outputs=[[1, 1, 2], [1]])
    out = apply_penalties(logits.clone(), meta)
    expected = [
        2.0 / 2,  # prompt token, positive: divided; no frequency/presence (prompt only)
        -1.0 * 2 - 0.5 * 2 - 0.25,  # output twice, negative: multiplied
        0.5 / 2 - 0.5 * 1 - 0.25,  # output once
        -0.5 * 2,  # prompt token, negative
        3.0,  # never seen
    ]
    assert torch.allclose(out[0], torch.tensor(expected))
    assert torch.equal(out[1], logits[1])


def test_frequency_and_presence_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    meta = build(
        [SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5)],
        prompts=[[0, 0, 1]],
        outputs=[[1, 2, 2, 2]],
    )
    out = apply_penalties(logits.clone(), meta)
    assert out[0].tolist() == [0.0, -1.0 + 0.5, -3.0 + 0.5, 0.0]


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert Sampler()(logits, build(params, prompts=[[0]])).sampled_token_ids == [1]
    assert Sampler()(logits, build(params, prompts=[[2]])).sampled_token_ids == [0]


def test_banned_tokens_are_never_sampled():
    torch.manual_seed(3)
    n = 2000
    logits = torch.tensor([[10.0, 9.0, 0.0, 0.0]]).expand(n, -1)
    out = Sampler()(logits, build([SamplingParams()] * n, banned=[[0]] * n))
    assert 0 not in out.sampled_token_ids and 1 in out.sampled_token_ids
    greedy = build([SamplingParams(temperature=0.0)] * 2, banned=[[0], []])
    assert Sampler()(logits[:2], greedy).sampled_token_ids == [1, 0]


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k():
    logits = torch.randn(3, 40, generator=gen(5))
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.7, top_k=3),
        SamplingParams(logprobs=0, temperature=0.0),
        SamplingParams(),
    ]
    meta = build(params, prompts=[[0, 1, 2], [], []], generators=[gen(0), None, None])
    out = Sampler()(logits, meta)
    raw = logits.log_softmax(-1)
    for row in (0, 1):
        lp = out.logprobs[row]
        tok = out.sampled_token_ids[row]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(raw[row, tok].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[row] > raw[row, tok]).sum())
    top = out.logprobs[0].top_logprobs
    vals, ids = raw[0].topk(5)
    assert list(top) == ids.tolist()  # most likely first
    assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.logprobs[1].top_logprobs == {} and out.logprobs[1].rank == 1
    assert out.logprobs[2] is None


def test_prompt_logprobs():
    logits = torch.randn(6, 30, generator=gen(6))
    next_ids = torch.tensor([3, 0, 29, 7, 7, 1])
    res = compute_prompt_logprobs(logits, next_ids, k=2)
    raw = logits.log_softmax(-1)
    assert len(res) == 6
    for t, entry in enumerate(res):
        tok = next_ids[t].item()
        assert entry.token_id == tok
        assert entry.logprob == pytest.approx(raw[t, tok].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[t] > raw[t, tok]).sum())
        assert list(entry.top_logprobs) == raw[t].topk(2).indices.tolist()


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=""), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(stop="x", detokenize=False), "stop"),
        (dict(seed=1.5), "seed"),
        # Bounds that keep one request from breaking the engine (see sampling_params.py).
        (dict(n=MAX_N + 1), "n"),
        (dict(seed=2**64 - 1, n=2), "seed"),
        (dict(seed=MAX_SEED + 1), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(repetition_penalty=1e-45), "repetition_penalty"),
        (dict(repetition_penalty=1e3), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(temperature=1e300), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_bounds_are_inclusive():
    assert SamplingParams(n=MAX_N, seed=MAX_SEED).n == MAX_N
    assert SamplingParams(seed=-(2**63), repetition_penalty=1e-2).seed == -(2**63)
    assert SamplingParams(repetition_penalty=1e2, temperature=3e38).repetition_penalty == 1e2
    assert BeamSearchParams(beam_width=MAX_N, max_tokens=4).beam_width == MAX_N
    with pytest.raises(ValueError, match=rf"^beam_width must be in \[1, {MAX_N}\]"):
        BeamSearchParams(beam_width=MAX_N + 1, max_tokens=4)


def test_sampling_params_messages_and_normalization():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0)
    p = SamplingParams(stop="###", top_k=-1, max_tokens=None, min_tokens=100)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.top_k == 0
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    g = SamplingParams(temperature=1e-6, top_p=0.5, top_k=3, min_p=0.2)
    assert g.is_greedy and g.sampling_type == SamplingType.GREEDY
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(beam_width=0, max_tokens=4), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, max_tokens=4, temperature=-0.5), "temperature"),
        (dict(beam_width=2, max_tokens=4, length_penalty=float("inf")), "length_penalty"),
    ],
)
def test_beam_search_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        BeamSearchParams(**kwargs)
    assert BeamSearchParams(beam_width=4, max_tokens=8).length_penalty == 1.0
