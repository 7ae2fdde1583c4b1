"""Scheduling policies through LLM.generate (a tiny model, one sequence at a time): the order
in which requests start follows `priority`, `user` and the predicted length; bad values are
refused at the door."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [100 + 7 * i + j for j in range(6)]} for i in range(4)]


def start_order(outs) -> list[int]:
    """Prompt indices by the time their first token came (one runs at a time)."""
    return sorted(range(len(outs)), key=lambda i: outs[i].metrics["first_token_time"])


@pytest.fixture(scope="module")
def make_llm(tiny_llama_dir):
    llms = {}

    def make(policy: str, **kwargs) -> LLM:
        if policy not in llms:
            llms[policy] = LLM(tiny_llama_dir, scheduling_policy=policy, max_num_seqs=1,
                               cpu_threads=1, num_gpu_blocks_override=16, **kwargs)
        return llms[policy]
    yield make
    for llm in llms.values():
        llm.shutdown()


def test_generate_runs_prompts_in_priority_order(make_llm):
    llm = make_llm("priority")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False, priority=[3, 0, 2, 1])
    assert start_order(outs) == [1, 3, 2, 0]
    outs = llm.generate(PROMPTS, params, use_tqdm=False, priority=1)  # one for all: FCFS
    assert start_order(outs) == [0, 1, 2, 3]
    # The tokens do not depend on the order (greedy, one sequence at a time).
    again = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_priority_is_refused_under_another_policy_and_when_malformed(make_llm):
    fcfs = make_llm("fcfs")
    with pytest.raises(ValueError, match="got priority 1 but the scheduling policy is 'fcfs'"):
        fcfs.generate(PROMPTS[0], use_tqdm=False, priority=1)
    prio = make_llm("priority")
    with pytest.raises(ValueError, match="got 2 priority values for 4 prompts"):
        prio.generate(PROMPTS, use_tqdm=False, priority=[0, 1])
    for bad in (0.5, True, 2**63):
        with pytest.raises(ValueError, match="priority must be an int in int64's range"):
            prio.generate(PROMPTS[:1], use_tqdm=False, priority=[bad])
    with pytest.raises(ValueError, match="user must be a str or a list"):
        prio.generate(PROMPTS[:1], use_tqdm=False, user=7)
    assert not prio.llm_engine.has_unfinished_requests()


def test_generate_sjf_oracle_and_fair_users(make_llm):
    sjf = make_llm("sjf", length_predictor="oracle", sjf_aging_rate=0.0)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 2, 5, 1)]
    assert start_order(sjf.generate(PROMPTS, params, use_tqdm=False)) == [3, 1, 2, 0]
    fair = make_llm("fair")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # a's first request runs; then b's (a's counter has grown), then a's, then b's.
    outs = fair.generate(PROMPTS, params, use_tqdm=False, user=["a", "a", "b", "b"])
    assert start_order(outs) == [0, 2, 1, 3]


def test_priority_and_user_cross_the_process_boundary():
    """The multiprocess core gets them in the EngineCoreRequest (msgpack, array-like)."""
    from pagedllm.engine.protocol import EngineCoreRequest, MsgpackDecoder, MsgpackEncoder

    req = EngineCoreRequest("r", [1, 2], SamplingParams(max_tokens=2), arrival_time=1.5,
                            priority=-3, cache_salt="s", user="alice")
    back = MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(req))
    assert (back.priority, back.user, back.cache_salt) == (-3, "alice", "s")
