"""A step that raises fails the request that caused it; the others finish with the tokens they
would have had without it (engine/isolation.py).

The bad requests here skip the frontend's validation (they go straight to the core, as a
validation bug would let them) and fail for real inside a step: the sampler indexing logits
with an id outside the vocabulary, an int64 overflow building the top-k tensor, a seed that
overflows when n > 1 forks add their offsets.
"""

from __future__ import annotations

import pytest

from pagedllm import LLM
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.sampling_params import SamplingParams
from tests.conftest import SMALL_ENGINE, TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]
GOOD_PROMPTS = [[1, 5, 9, 22, 40, 7], [1, 300, 301, 302], list(range(1, 40))]
GOOD = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)



def unchecked(params: SamplingParams, **fields) -> SamplingParams:
    """Params with values SamplingParams' own checks refuse, as a validation bug would let in."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


BAD = {
    "stop id outside the vocabulary with min_tokens": unchecked(
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3), stop_token_ids=[VOCAB + 5]),
    "top_k beyond int64": unchecked(
        SamplingParams(temperature=1.0, max_tokens=8, seed=1), top_k=2**63),
    "seed overflow with n > 1": unchecked(
        SamplingParams(temperature=1.0, n=2, max_tokens=8), seed=2**64 - 1),
}


def run(core, requests: list[EngineCoreRequest], max_steps: int = 500) -> dict:
    """Drive the core to the end; returns request id -> (token ids per index, error)."""
    for req in requests:
        core.add_request(req)
    results: dict[str, tuple[dict[int, list[int]], str | None]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            toks, err = results.setdefault(out.request_id, ({}, None))
            for d in out.seqs:
                toks.setdefault(d.index, []).extend(d.new_token_ids)
            if out.error:
                results[out.request_id] = (toks, out.error)
    assert not core.has_unfinished_requests()
    return results


def good_requests(tag: str) -> list[EngineCoreRequest]:
    return [EngineCoreRequest(f"{tag}-good-{i}", p, GOOD) for i, p in enumerate(GOOD_PROMPTS)]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm(request, tiny_llama_dir):
    return LLM(str(tiny_llama_dir), async_scheduling=request.param,
               max_num_batched_tokens=32, **SMALL_ENGINE)


@pytest.fixture(scope="module")
def reference(llm):
    return run(llm.llm_engine.engine_core, good_requests("ref"))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_fails_alone(llm, reference, name):
    core = llm.llm_engine.engine_core
    failed_before = core.get_metrics()["num_requests_failed_total"]
    bad = EngineCoreRequest(f"bad-{name}", [1, 17, 18, 19], BAD[name])
    # The bad request arrives between good ones, so it shares their batches.
    goods = good_requests(name)
    results = run(core, goods[:2] + [bad] + goods[2:])

    toks, err = results[bad.request_id]
    assert err is not None and "the engine step failed on this request" in err
    for i in range(len(GOOD_PROMPTS)):
        assert results[f"{name}-good-{i}"] == (reference[f"ref-good-{i}"][0], None)
    metrics = core.get_metrics()
    assert metrics["num_requests_failed_total"] == failed_before + 1
    assert metrics["step_failures_total"] >= 1
    assert core.block_manager.usage() == 0 and core.check_integrity()
    assert not core.isolation.quarantine and not core.isolation.suspicions

    # The engine serves on, with the same tokens.
    again = run(core, [EngineCoreRequest(f"{name}-after", GOOD_PROMPTS[0], GOOD)])
    assert again[f"{name}-after"] == (reference["ref-good-0"][0], None)


def test_a_failure_only_seen_in_batches_ends(llm, reference, monkeypatch):
    """A step that raises whenever it runs two requests: each passes alone, so none is to
    blame, and the suspicion limit fails them instead of isolating forever."""
    from pagedllm.engine.isolation import MAX_SUSPICIONS

    core = llm.llm_engine.engine_core

    def fails_in_batches(run_step):
        def wrapped(out, *args, **kwargs):
            if len({id(e.group) for e in out.scheduled}) > 1:
                raise RuntimeError("batched step failed")
            return run_step(out, *args, **kwargs)
        return wrapped

    for name in ("execute_model", "launch"):
        monkeypatch.setattr(core.executor, name, fails_in_batches(getattr(core.executor, name)))
    results = run(core, good_requests("batch"))
    assert core.get_metrics()["step_failures_total"] >= MAX_SUSPICIONS
    for toks, err in results.values():
        assert f"in {MAX_SUSPICIONS} engine steps that failed" in err
    assert core.block_manager.usage() == 0 and core.check_integrity()
    # Alone, a request still runs to its reference tokens.
    assert run(core, good_requests("solo")[2:])["solo-good-2"] == (reference["ref-good-2"][0], None)


def test_failures_no_request_caused_stay_fatal(llm, monkeypatch):
    core = llm.llm_engine.engine_core

    def gone():
        raise RuntimeError("tensor-parallel rank 1 is gone (killed)")

    def step_fails(*a, **k):
        raise RuntimeError("all-reduce failed")

    monkeypatch.setattr(core.executor, "check_health", gone)
    monkeypatch.setattr(core.executor, "execute_model", step_fails)
    monkeypatch.setattr(core.executor, "launch", step_fails)
    core.add_request(EngineCoreRequest("fatal", GOOD_PROMPTS[0], GOOD))
    with pytest.raises(RuntimeError, match="all-reduce failed"):
        for _ in range(10):
            core.step()
    monkeypatch.undo()
    core.abort_requests(["fatal"])
    assert core.block_manager.usage() == 0 and core.check_integrity()
