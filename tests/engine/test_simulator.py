"""The simulated executor (load_format="simulate"): an exact cost model, a deterministic
virtual clock, tokens that respect each request's length, and the paper's memory sizes."""

from __future__ import annotations

import dataclasses

import pytest

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core import EngineCore
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.sampling_params import SamplingParams
from pagedllm.sim.cost_model import CostModel, ModelShape, StepShape, load_profile

# OPT-13B (the paper's Table 1 model), as a config alone: the simulator allocates nothing.
OPT_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480,
               word_embed_proj_dim=5120, vocab_size=50272, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def opt13b_dir(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("opt-13b")
    transformers.OPTConfig(**OPT_13B).save_pretrained(path)
    return str(path)


def tiny_shape(gated=False) -> ModelShape:
    return ModelShape(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4,
                      intermediate_size=16, vocab_size=32, gated_mlp=gated,
                      tie_word_embeddings=True, max_position_embeddings=0,
                      learned_positions=False)


def test_cost_model_prices_a_step_exactly():
    """2 layers, hidden 8, 2 heads of 4, MLP 16 (two matrices), vocab 32, fp32:
      layer GEMM params = 8*8 (q) + 2*8*8 (k, v) + 8*8 (o) + 2*8*16 (MLP) = 512
      prefill of 4 tokens, one sampled row, 1 GB/s, 1 GFLOP/s linear and attention:
        weights   2*512*4 + LM head 32*8*4 = 5120 B       -> 5.120 us
        linear    2*4*(2*512) + 2*1*(32*8) = 8704 FLOP     -> 8.704 us
        K/V       (4 read + 4 written) * 128 B/token       -> 1.024 us
        attention 10 (query, key) pairs * 4*2*4*2 FLOP     -> 0.640 us
      overheads 100 us + 10 us/seq + 1 us/token + 20 us/seq of a step that prefills = 134 us"""
    profile = dataclasses.replace(
        load_profile("cpu"), mem_bw_gbps=1.0, linear_tflops=1e-3, attn_tflops=1e-3,
        step_overhead_us=100.0, seq_overhead_us=10.0, token_overhead_us=1.0,
        mixed_seq_overhead_us=20.0, overlap=1.0)
    assert tiny_shape().layer_params == 512
    step = StepShape.of([(4, 4)], num_sampled=1)
    assert (step.num_tokens, step.attn_pairs, step.kv_read_tokens) == (4, 10, 4)
    roofline = CostModel(tiny_shape(), profile, "float32").step_time(step)
    assert roofline == pytest.approx((134 + 8.704 + 1.024) * 1e-6)
    additive = CostModel(tiny_shape(), dataclasses.replace(profile, overlap=0.0), "float32")
    assert additive.step_time(step) == pytest.approx((134 + 5.12 + 8.704 + 1.024 + 0.64) * 1e-6)
    # A decode step of 2 sequences at contexts 10 and 20: each new token attends to its whole
    # context (30 pairs, 30 K/V tokens read); no prefill, so no mixed-batch overhead:
    #   weights 5120 B, linear 2*2*1024 + 2*2*256 = 5120 FLOP, K/V (30 + 2) * 128 B = 4096 B
    decode = StepShape.of([(1, 10), (1, 20)], num_sampled=2)
    assert (decode.attn_pairs, decode.kv_read_tokens) == (30, 30)
    assert CostModel(tiny_shape(), profile, "float32").step_time(decode) == pytest.approx(
        (100 + 2 * 10 + 2 * 1 + 5.12 + 4.096) * 1e-6)


def test_opt13b_on_a100_40gb_matches_the_papers_memory(opt13b_dir):
    """Table 1: OPT-13B on one A100-40GB holds 26 GB of weights and 15.7K KV token slots."""
    config = EngineArgs(model=opt13b_dir, load_format="simulate").create_engine_config()
    assert config.model.dtype == "float16" and config.sim_profile == "a100-40gb"
    core = EngineCore(config, set())
    weights_gb = core.executor.cost.weight_bytes() / 1e9
    slots = core.block_manager.pool.num_blocks * config.cache.block_size
    assert weights_gb == pytest.approx(25.7, abs=0.1)
    assert slots == pytest.approx(15_700, rel=0.05)
    assert core.executor.block_bytes() == 2 * 40 * 5120 * 2 * 16  # K and V, 40 layers, fp16


def collect(outputs, tokens: dict[str, list[int]]) -> None:
    for o in outputs:
        assert o.error is None, o.error
        for d in o.seqs:
            tokens.setdefault(o.request_id, []).extend(d.new_token_ids)


def run(model_dir, seed=0, allocator="paged", num_blocks=64, **kwargs):
    """Six requests arriving over time; returns (clock, steps, {id: tokens})."""
    args = EngineArgs(model=model_dir, load_format="simulate", seed=seed, kv_allocator=allocator,
                      num_gpu_blocks_override=num_blocks, **kwargs)
    core = EngineCore(args.create_engine_config(), set())
    lengths = [(30, 20), (200, 5), (7, 40), (64, 64), (120, 9), (15, 33)]
    tokens: dict[str, list[int]] = {}
    for i, (prompt, out) in enumerate(lengths):
        core.add_request(EngineCoreRequest(str(i), list(range(1, prompt + 1)),
                                           SamplingParams(max_tokens=out),  # EOS not ignored
                                           arrival_time=1.0 + i))
        for _ in range(3):
            collect(core.step(), tokens)
    while core.has_unfinished_requests():
        collect(core.step(), tokens)
    assert [len(tokens[str(i)]) for i in range(len(lengths))] == [o for _, o in lengths]
    m = core.get_metrics()
    return m["sim_clock_s"], m["sim_steps_total"], tokens


def test_virtual_clock_and_tokens_are_deterministic(opt13b_dir):
    clock, steps, tokens = run(opt13b_dir)
    assert clock > 0 and steps > 0
    assert run(opt13b_dir) == (clock, steps, tokens)  # same seed: the same to the last bit
    clock2, steps2, tokens2 = run(opt13b_dir, seed=1)
    assert (clock2, steps2) == (clock, steps) and tokens2 != tokens  # price depends on shapes
    # Tokens are drawn from the middle of the vocabulary, away from special ids (EOS = 2).
    assert all(50272 // 8 <= t < 50272 // 2 for ts in tokens.values() for t in ts)


def test_clock_reflects_the_allocator(opt13b_dir):
    """Orca-Max runs fewer requests per step in the same memory, so the same work takes
    more steps; the clock follows the steps, not the host's time."""
    paged = run(opt13b_dir, allocator="paged", num_blocks=40)
    orca = run(opt13b_dir, allocator="orca-max", num_blocks=40, max_model_len=512)
    assert orca[1] > paged[1] and orca[0] > paged[0]
    assert orca[2] == paged[2]  # the stream depends on sequence and position only


def test_simulate_rejects_logprobs(opt13b_dir):
    args = EngineArgs(model=opt13b_dir, load_format="simulate", num_gpu_blocks_override=64)
    core = EngineCore(args.create_engine_config(), set())
    core.add_request(EngineCoreRequest("0", [1, 2, 3], SamplingParams(max_tokens=2, logprobs=1),
                                       arrival_time=1.0))
    outputs = core.step()
    assert outputs and "computes no logits" in (outputs[0].error or "")
