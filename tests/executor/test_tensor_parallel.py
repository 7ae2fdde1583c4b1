"""Tensor parallelism: TP=2 (and 3) executors against the TP=1 executor on the same plans.

The reference is the engine against itself under a toggle: a small greedy loop drives the real
Scheduler and BlockManager (core/, so nothing from the engine layer) and hands each plan to an
executor; at TP=1 the model is unsharded, at TP=2 every projection, the KV heads and the
vocabulary are split over processes that talk through gloo. Sampled ids must be equal and
logprobs (sampled and prompt) equal within 1e-4 on checkpoints saved by transformers.
"""

from __future__ import annotations

import time

import pytest
import torch
import transformers

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.executor import create_executor
from pagedllm.executor.multiproc import MultiprocExecutor
from pagedllm.executor.uniproc import UniProcExecutor
from pagedllm.layers.sampler import SamplingMetadata
from pagedllm.sampling_params import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)
# GQA with fewer KV heads than ranks (replicated at tp=2), and odd vocabularies (padded rows).
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=1, vocab_size=1001,
                   tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=999,
                   tie_word_embeddings=True)),
}
PROMPT_LENS = (5, 23, 40)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for name, (cfg_cls, model_cls, extra) in MODELS.items():
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**TINY, **extra)).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        made[name] = str(path)
    return made


def engine_config(model: str, tp: int = 1, backend: str | None = None, **kw):
    args = dict(model=model, device="cpu", dtype="float32", tensor_parallel_size=tp,
                distributed_executor_backend=backend, num_gpu_blocks_override=64,
                swap_space=0, max_num_batched_tokens=32, max_num_seqs=8)
    return EngineArgs(**{**args, **kw}).create_engine_config()


def greedy(executor, config, prompts: list[list[int]], max_tokens: int = MAX_TOKENS,
           prompt_logprobs_seq: int | None = 1):
    """Drive Scheduler + BlockManager + executor to the end; returns (tokens, sampled logprobs,
    top-2 logprobs, prompt logprobs) per sequence."""
    num_blocks = executor.determine_num_blocks()
    executor.init_cache(num_blocks, 0)
    bm = BlockManager(num_blocks, config.cache.block_size, enable_caching=True)
    scheduler = Scheduler(config.scheduler, bm)
    seqs = [Sequence(i, list(p)) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(SequenceGroup(f"r{seq.seq_id}", [seq], None, max_tokens=max_tokens))
    logprobs = {s.seq_id: [] for s in seqs}
    prompt_lps = {s.seq_id: [] for s in seqs}
    params = SamplingParams(temperature=0.0, logprobs=2)
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        rows = [e for e in out.scheduled if e.samples]
        sampling = SamplingMetadata.build(
            [params] * len(rows), [None] * len(rows), [e.seq.prompt_token_ids for e in rows],
            [e.seq.output_token_ids for e in rows], None, executor.device) if rows else None
        want = {e.seq.seq_id: 2 for e in out.scheduled if e.seq.seq_id == prompt_logprobs_seq
                and e.seq.num_computed_tokens < e.seq.num_prompt_tokens - 1}
        result = executor.execute_model(out, sampling, None, want)
        scheduler.update_from_output(out)
        for _, (_, rows_lp) in sorted(result.prompt_logprobs.items()):
            prompt_lps[prompt_logprobs_seq] += [(r.logprob, r.top_logprobs) for r in rows_lp]
        for e, tok, lp in zip(rows, result.sampler_output.sampled_token_ids,
                              result.sampler_output.logprobs):
            e.seq.append_token(tok, lp.logprob)
            logprobs[e.seq.seq_id].append((lp.logprob, lp.top_logprobs))
            if e.seq.num_output_tokens >= max_tokens:
                scheduler.finish_seq(e.seq, SequenceStatus.FINISHED_LENGTH)
        scheduler.remove_finished()
    return [s.output_token_ids for s in seqs], logprobs, prompt_lps


def assert_same_run(ref, got, atol=1e-4):
    ref_tokens, ref_lp, ref_plp = ref
    tokens, lp, plp = got
    assert tokens == ref_tokens
    for table_ref, table in ((ref_lp, lp), (ref_plp, plp)):
        for seq_id, rows in table_ref.items():
            assert len(table[seq_id]) == len(rows)
            for (a, top_a), (b, top_b) in zip(rows, table[seq_id]):
                assert abs(a - b) < atol
                assert top_a.keys() == top_b.keys()
                assert all(abs(top_a[t] - top_b[t]) < atol for t in top_a)
    assert any(ref_plp.values())  # prompt logprobs were compared, not skipped


def prompts_for(vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def run_executor(config, prompts, **kw):
    ex = create_executor(config)
    try:
        return greedy(ex, config, prompts, **kw)
    finally:
        ex.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_equals_tp1(checkpoints, arch):
    prompts = prompts_for(MODELS[arch][2]["vocab_size"])
    ref = run_executor(engine_config(checkpoints[arch]), prompts)
    config = engine_config(checkpoints[arch], tp=2)
    assert config.parallel.distributed_executor_backend == "mp"
    t0 = time.monotonic()
    ex = create_executor(config)
    try:
        assert isinstance(ex, MultiprocExecutor)
        # This rank's KV heads: 1 replicated (llama), 2 split (qwen2): K and V, 2 layers,
        # 16 tokens, head_dim 16, fp32.
        kv_heads = MODELS[arch][2]["num_key_value_heads"]
        assert ex.block_bytes() == 2 * 2 * 16 * max(1, kv_heads // 2) * 16 * 4
        got = greedy(ex, config, prompts)
    finally:
        ex.shutdown()
    print(f"{arch} tp=2: {time.monotonic() - t0:.1f} s")
    assert_same_run(ref, got)


def test_tp1_block_bytes_uses_all_kv_heads(checkpoints):
    ex = create_executor(engine_config(checkpoints["qwen2"]))
    assert isinstance(ex, UniProcExecutor)
    assert ex.block_bytes() == 2 * 2 * 16 * 2 * 16 * 4  # both KV heads: no tp division at tp=1


@pytest.mark.slow
def test_ray_tp2_equals_tp1(checkpoints):
    """A local Ray cluster (2 CPUs) places rank 1 as an actor; same tokens as TP=1."""
    ray = pytest.importorskip("ray")
    prompts = prompts_for(MODELS["llama"][2]["vocab_size"], seed=2)
    ref = run_executor(engine_config(checkpoints["llama"]), prompts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.monotonic()
        ex = create_executor(engine_config(checkpoints["llama"], tp=2, backend="ray"))
        try:
            assert type(ex).__name__ == "RayExecutor"
            got = greedy(ex, ex.config, prompts)
        finally:
            ex.shutdown()
        print(f"ray tp=2: {time.monotonic() - t0:.1f} s")
    finally:
        ray.shutdown()
    assert_same_run(ref, got)


@pytest.mark.slow
def test_default_gguf_model_tp3_equals_tp1():
    """SmolLM2-135M (9 heads, 3 KV heads, Q4_1 GGUF): tp=3 splits every head group."""
    from pagedllm.loader import default_model_path

    path = default_model_path()
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30], [1, 504, 3575, 282, 4649]]
    kw = dict(num_gpu_blocks_override=32, max_num_batched_tokens=64)
    ref = run_executor(engine_config(path, **kw), prompts, max_tokens=12,
                       prompt_logprobs_seq=0)
    t0 = time.monotonic()
    got = run_executor(engine_config(path, tp=3, **kw), prompts, max_tokens=12,
                       prompt_logprobs_seq=0)
    print(f"SmolLM2 tp=3: {time.monotonic() - t0:.1f} s")
    assert_same_run(ref, got, atol=1e-3)


def test_dummy_weights_are_the_same_model_at_every_tp(monkeypatch):
    """load_format="dummy": rank r of tp=2 holds exactly its slice of the tp=1 model, sliced
    here by hand (1 KV head replicated, vocabulary 1001 padded to 2 x 501)."""
    from pagedllm.distributed import parallel_state
    from pagedllm.loader import initialize_dummy_weights
    from pagedllm.models.llama import LlamaForCausalLM

    cfg = transformers.LlamaConfig(**TINY, **MODELS["llama"][2])

    def build(tp: int, rank: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(parallel_state, "_TP_SIZE", tp)
        monkeypatch.setattr(parallel_state, "_TP_RANK", rank)
        model = LlamaForCausalLM(cfg)
        initialize_dummy_weights(model, seed=5)
        return dict(model.named_parameters())

    full = build(1, 0)
    q, kv, inter = 4 * 16, 16, 128
    for r in range(2):
        shard = build(2, r)
        assert shard.keys() == full.keys()
        rows = full["model.embed_tokens.weight"][r * 501:(r + 1) * 501]
        want = {"model.embed_tokens.weight": torch.cat([rows, torch.zeros(501 - len(rows), 64)]),
                "lm_head.weight": torch.cat([full["lm_head.weight"][r * 501:(r + 1) * 501],
                                             torch.zeros(501 - len(rows), 64)])}
        for i in range(2):
            p = f"model.layers.{i}."
            qkv = full[p + "self_attn.qkv_proj.weight"]
            gate_up = full[p + "mlp.gate_up_proj.weight"]
            half_q, half_i = q // 2, inter // 2
            want[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [qkv[r * half_q:(r + 1) * half_q], qkv[q:q + kv], qkv[q + kv:]])
            want[p + "self_attn.o_proj.weight"] = \
                full[p + "self_attn.o_proj.weight"][:, r * half_q:(r + 1) * half_q]
            want[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [gate_up[r * half_i:(r + 1) * half_i], gate_up[inter + r * half_i:][:half_i]])
            want[p + "mlp.down_proj.weight"] = \
                full[p + "mlp.down_proj.weight"][:, r * half_i:(r + 1) * half_i]
        for name, param in shard.items():
            assert torch.equal(param, want.get(name, full[name])), name
