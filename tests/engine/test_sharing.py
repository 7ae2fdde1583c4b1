"""Memory sharing through the engine: parallel sampling and beam search on fork + copy-on-write,
their equality under forced preemption (recompute and swap), and beam search equal to HF."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.loader import default_model_path, iter_weights, load_model_config

from ..conftest import SMALL_ENGINE


def test_n8_over_a_320_token_prompt_fits_48_blocks_only_by_sharing(chat_prompt_ids):
    # 320 prompt tokens = 20 blocks, shared by all 8 samples (ref_cnt 8). 48 new tokens each
    # take 3 more blocks per sample: 20 + 8 * 3 = 44 <= 48. Unshared it would need 8 * 23.
    prompt = (chat_prompt_ids[0] * 10)[:320]
    llm = LLM(num_gpu_blocks_override=48, **SMALL_ENGINE)
    params = SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=48, ignore_eos=True)
    engine = llm.llm_engine
    engine.add_request("r", None, params, prompt)
    peak_refs, peak_used = 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        bm = engine.engine_core.block_manager
        peak_refs = max(peak_refs, max(b.ref_cnt for b in bm.pool.blocks))
        peak_used = max(peak_used, bm.pool.num_blocks - bm.num_free_blocks)
        bm.check_integrity()
    (out,) = outs
    assert [len(o.token_ids) for o in out.outputs] == [48] * 8
    assert len({tuple(o.token_ids) for o in out.outputs}) == 8  # 8 different samples
    assert peak_refs == 8 and peak_used == 44
    m = llm.get_metrics()
    assert m["num_preemptions_total"] == 0 and m["kv_cache_usage_perc"] == 0.0


def _sharing_workload(llm, prompt_ids):
    sampled = llm.generate(
        [{"prompt_token_ids": p} for p in prompt_ids[:4]],
        SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=20, ignore_eos=True),
        use_tqdm=False)
    beams = llm.beam_search([{"prompt_token_ids": p} for p in prompt_ids[4:7]],
                            BeamSearchParams(beam_width=3, max_tokens=16), use_tqdm=False)
    return ([[o.token_ids for o in r.outputs] for r in sampled],
            [[(s.token_ids, round(s.cum_logprob, 3)) for s in b.sequences] for b in beams])


@pytest.fixture(scope="module")
def sharing_reference(default_llm, chat_prompt_ids):
    return _sharing_workload(default_llm, chat_prompt_ids)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption_of_groups_and_beams_gives_the_same_outputs(
        mode, chat_prompt_ids, sharing_reference):
    llm = LLM(num_gpu_blocks_override=14, preemption_mode=mode, **SMALL_ENGINE)
    assert _sharing_workload(llm, chat_prompt_ids) == sharing_reference
    m = llm.get_metrics()
    assert m["num_preemptions_total"] > 0
    if mode == "swap":
        assert m["num_swapped_out_blocks_total"] > 0
    assert m["kv_cache_usage_perc"] == 0.0
    llm.llm_engine.engine_core.block_manager.check_integrity()


def test_default_preemption_swaps_groups_and_recomputes_singles(chat_prompt_ids):
    llm = LLM(num_gpu_blocks_override=14, **SMALL_ENGINE)
    sched = llm.llm_engine.engine_core.scheduler
    modes = []
    original = sched._preempt

    def spy(group, out):
        modes.append((len(group.live_seqs()), sched.preemption_mode(group).value))
        original(group, out)

    sched._preempt = spy
    _sharing_workload(llm, chat_prompt_ids)
    assert modes, "the workload must preempt"
    assert all(mode == ("swap" if n > 1 else "recompute") for n, mode in modes), modes


def test_beam_search_equals_hf(default_llm, chat_prompt_ids):
    path = default_model_path()
    config = load_model_config(path, "gguf")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(dict(iter_weights(path, "gguf", config)), strict=False)
    hf.tie_weights()
    cases = [(chat_prompt_ids[0], 4, 1.0), (chat_prompt_ids[1], 4, 1.0),
             (chat_prompt_ids[3], 2, 0.5)]
    for ids, width, penalty in cases:
        ours = default_llm.beam_search(
            [{"prompt_token_ids": ids}],
            BeamSearchParams(beam_width=width, max_tokens=24, length_penalty=penalty),
            use_tqdm=False)[0]
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=width,
                            num_return_sequences=width, do_sample=False, early_stopping=False,
                            length_penalty=penalty, max_new_tokens=24, pad_token_id=2)
        expected = []
        for row in y.tolist():
            gen = row[len(ids):]
            expected.append(gen[:gen.index(2) + 1] if 2 in gen else gen)
        assert [s.token_ids for s in ours.sequences] == expected
        scores = [s.cum_logprob / len(s.token_ids) ** penalty for s in ours.sequences]
        assert scores == sorted(scores, reverse=True)  # best first
        assert all(s.text == default_llm.get_tokenizer().decode(s.token_ids,
                   skip_special_tokens=True) for s in ours.sequences)
    assert default_llm.get_metrics()["kv_cache_usage_perc"] == 0.0


def test_dropped_beams_free_their_blocks_at_once(chat_prompt_ids):
    llm = LLM(**SMALL_ENGINE)
    engine = llm.llm_engine
    engine.add_beam_search_request("b", None, BeamSearchParams(beam_width=4, max_tokens=12),
                                   chat_prompt_ids[2])
    while engine.has_unfinished_requests():
        engine.step()
        bm = engine.engine_core.block_manager
        live = engine.engine_core.requests["b"].live_seqs() if "b" in engine.engine_core.requests else []
        # Only live beams hold blocks: no table survives for a dropped beam.
        assert set(bm.block_tables) == {s.seq_id for s in live}
        assert len(live) <= 4
        bm.check_integrity()
    assert engine.engine_core.block_manager.usage() == 0.0
