"""TP=2 through the whole engine (two worker processes over gloo, as tests/executor does)
against HF: greedy tokens equal, and each step's top-2 logprobs equal HF's within 1e-4.

What each family's split exercises: Phi-3 cuts its checkpoint's fused qkv_proj and gate_up_proj
back into q/k/v and gate/up before each rank keeps its slice; Mixtral and Qwen2-MoE split every
expert by its intermediate dimension (one all-reduce per MoE block) with a replicated router;
opt-350m replicates project_in/out and splits the offset position table like a vocabulary.
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

from .conftest import hf_greedy, prompts

MAX_TOKENS = 8
ENGINE = dict(cpu_kv_cache_gib=0.05, swap_space=0.05)


@pytest.mark.parametrize("family", [
    "phi3", "mixtral-window", "opt-350m",
    pytest.param("qwen2-moe", marks=pytest.mark.slow),
    pytest.param("gpt2", marks=pytest.mark.slow),
    pytest.param("qwen3", marks=pytest.mark.slow),
])
def test_tp2_matches_hf(family_checkpoint, family):
    path, hf = family_checkpoint(family)
    batch = prompts()
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2,
                                           ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    for i, (prompt, out) in enumerate(zip(batch, outs)):
        tokens, logprobs = hf_greedy(hf, prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == tokens, f"prompt {i}"
        for step, top in enumerate(out.outputs[0].logprobs):
            for token_id, lp in top.items():
                assert abs(lp.logprob - logprobs[step, token_id].item()) < 1e-4, (i, step)
