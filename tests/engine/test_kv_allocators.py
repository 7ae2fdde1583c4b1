"""The paper's baselines as KV allocators of the real engine: same tokens, different memory."""

from __future__ import annotations

import argparse

import pytest
import torch

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs

ALLOCATORS = ("paged", "orca-max", "orca-pow2", "orca-oracle")

# Prompts of different lengths and outputs of different lengths, so regions of several orders
# come and go. 40 blocks of 16 tokens: orca-max (max_model_len 512 = 32 blocks) runs one
# request at a time, the others a few; paged runs all of them at once.
PROMPT_LENS = (5, 37, 12, 60, 23, 9, 48, 17)
MAX_TOKENS = (12, 4, 20, 8, 3, 15, 6, 10)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir):
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 4000 + 100 for j in range(n)]}
               for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in MAX_TOKENS]
    results = {}
    threads = torch.get_num_threads()  # cpu_threads below sets the process-wide count
    for allocator in ALLOCATORS:
        # One thread: a model this small gains nothing from two, and steps stay fast when
        # other processes load the cores.
        llm = LLM(tiny_llama_dir, kv_allocator=allocator, num_gpu_blocks_override=40,
                  max_num_batched_tokens=256, swap_space=0.01, cpu_threads=1)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.check_integrity()
        results[allocator] = ([o.outputs[0].token_ids for o in outs], llm.get_metrics())
        llm.shutdown()
    torch.set_num_threads(threads)
    return results


def test_greedy_outputs_are_identical_under_every_allocator(runs):
    reference, _ = runs["paged"]
    assert [len(t) for t in reference] == list(MAX_TOKENS)
    for allocator in ALLOCATORS[1:]:
        tokens, _ = runs[allocator]
        assert tokens == reference, allocator


def test_memory_split_orders_the_allocators_as_the_paper_does(runs):
    shares = {a: m for a, (_, m) in runs.items()}
    for allocator, m in shares.items():
        total = sum(m[f"kv_memory_{k}"] for k in ("token_states", "reserved", "internal_frag",
                                                   "external_frag"))
        assert total == pytest.approx(1.0), allocator
        assert m["kv_cache_usage_perc"] == 0.0 and m["num_preemptions_total"] == 0
    token = {a: m["kv_memory_token_states"] for a, m in shares.items()}
    assert token["paged"] > token["orca-oracle"] > token["orca-max"]
    assert token["orca-pow2"] > token["orca-max"]
    assert shares["orca-oracle"]["kv_memory_internal_frag"] == 0.0  # it reserves exactly
    # Paged holds every request at once here: nothing waits, so nothing is lost outside blocks.
    assert shares["paged"]["kv_memory_external_frag"] == 0.0
    # Orca-Max reserves 512 slots for requests of at most 100 tokens.
    assert shares["orca-max"]["kv_memory_internal_frag"] > 0.5


def test_orca_modes_reject_what_needs_shared_blocks(tiny_llama_dir):
    with pytest.raises(ValueError, match="prefix caching"):
        LLM(tiny_llama_dir, kv_allocator="orca-max", enable_prefix_caching=True)
    with pytest.raises(ValueError, match="preemption_mode='swap'"):
        LLM(tiny_llama_dir, kv_allocator="orca-pow2", preemption_mode="swap")
    llm = LLM(tiny_llama_dir, kv_allocator="orca-oracle", num_gpu_blocks_override=40)
    assert not llm.llm_engine.config.cache.enable_prefix_caching  # off by default for Orca
    with pytest.raises(ValueError, match="n=2 shares KV blocks"):
        llm.generate("hi", SamplingParams(n=2, max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="beam search shares KV blocks"):
        llm.beam_search("hi", BeamSearchParams(beam_width=2, max_tokens=2), use_tqdm=False)
    out = llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)  # still usable
    assert len(out[0].outputs[0].token_ids) == 2
    llm.shutdown()


def test_cli_flag():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-allocator", "orca-pow2"]))
    assert args.kv_allocator == "orca-pow2" and args.enable_prefix_caching is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-allocator", "orca"])


def test_memory_split_reaches_prometheus(runs):
    from pagedllm.metrics import ServingMetrics

    _, metrics = runs["orca-pow2"]
    text = ServingMetrics(lambda: metrics, lambda: True).render().decode()
    for name in ("token_states", "reserved", "internal_frag", "external_frag", "unused"):
        line = next(ln for ln in text.splitlines()
                    if ln.startswith(f"pagedllm:kv_memory_{name} "))
        assert float(line.split()[1]) == pytest.approx(metrics[f"kv_memory_{name}"])
