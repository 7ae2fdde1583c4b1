"""Every family against HF transformers on the same tiny random checkpoint.

1. Logits: the model, built and loaded the way the engine does it (registry + load_weights
   over the safetensors stream), runs one sequence through the paged cache in a prefill chunk,
   a second chunk and decode steps; every position's logits equal HF's forward within fp32
   rounding.
2. Greedy tokens through the whole engine (`LLM`) with chunked prefill (16-token budget) and
   forced preemption (5 KV blocks of 16 for 4 sequences that need 11) equal HF's greedy loop.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.loader import iter_weights, load_model_config
from pagedllm.models.registry import get_model_class

from .conftest import FAMILIES, OneSequence, hf_greedy, prompts

MAX_TOKENS = 12
ENGINE = dict(cpu_kv_cache_gib=0.05, swap_space=0.05)
# The engine runs each family once; a variant that only changes the math inside a layer
# (pre-LN OPT, renormalized Qwen2-MoE routing) is covered by the logits test.
ENGINE_FAMILIES = [f for f in FAMILIES if f not in ("opt", "qwen2-moe-norm-topk")]


def load_ours(path: str) -> torch.nn.Module:
    config = load_model_config(path)
    model = get_model_class(config)(config)
    model.load_weights(iter_weights(path, "safetensors", config))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family_checkpoint, family):
    path, hf = family_checkpoint(family)
    ours = load_ours(path)
    ids = prompts()[-1]  # 47 tokens
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]  # [47, vocab]
    seq = OneSequence(ours, len(ids))
    got = torch.cat([seq.step(ids[:20]),  # prefill: one full block and a partial one
                     seq.step(ids[20:40]),  # a second chunk over cached blocks
                     *[seq.step([t]) for t in ids[40:]]])  # decode steps
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_engine_greedy_matches_hf_with_chunked_prefill_and_preemption(family_checkpoint,
                                                                       family):
    path, hf = family_checkpoint(family)
    batch = prompts()
    expected = [hf_greedy(hf, p, MAX_TOKENS)[0] for p in batch]
    llm = LLM(path, max_num_batched_tokens=16, num_gpu_blocks_override=5, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    for i, (out, want) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == want, f"prompt {i}"
    assert llm.get_metrics()["num_preemptions_total"] > 0
    llm.llm_engine.engine_core.block_manager.check_integrity()
