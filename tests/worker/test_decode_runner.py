"""The CUDA decode path's bookkeeping (worker/cuda_graph.py), checked on CPU.

The engine uses DecodeRunner on CUDA only, but its input layout (padding rows, slots, ragged
block tables written into static buffers) is plain indexing: run eagerly on a CPU device it must
give the same hidden states and the same KV-cache writes as the flat batch of prepare_inputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from pagedllm.core.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceGroup
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.forward_context import forward_context
from pagedllm.worker.cuda_graph import DecodeRunner, capture_sizes
from pagedllm.worker.model_runner import ModelRunner

BLOCK = 16


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(4096)[-1] == 512


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, vocab_size=512,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(cfg))
    config = EngineArgs(model=str(path), load_format="dummy", device="cpu", dtype="float32",
                        max_num_seqs=16).create_engine_config()
    runner = ModelRunner(config)
    # Larger weights than the dummy default, so that every input visibly changes the output.
    with torch.no_grad():
        for p in runner.model.parameters():
            p.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(1))
    runner.init_cache(64, 0)
    assert runner.decode_runner is None  # CPU engines never take the CUDA decode path
    return runner


def make_seqs(lengths: list[int]) -> list[ScheduledSeq]:
    """Sequences with shuffled, non-contiguous block ids, prefill not yet run."""
    gen = torch.Generator().manual_seed(0)
    free = torch.randperm(64, generator=gen).tolist()
    entries = []
    for i, n in enumerate(lengths):
        seq = Sequence(i, torch.randint(0, 512, (n,), generator=gen).tolist())
        blocks = [free.pop() for _ in range(-(-(n + 1) // BLOCK))]
        group = SequenceGroup(str(i), [seq], params=None)
        entries.append(ScheduledSeq(seq, group, n, blocks))
    return entries


def test_padded_decode_equals_the_flat_batch(runner):
    # 5 sequences -> padded to 8; lengths cross block boundaries (15 + 1 = 16, 16 + 1 = 17).
    entries = make_seqs([3, 15, 16, 40, 7])
    runner.execute(SchedulerOutput(scheduled=entries), None)  # prefill writes the cache
    for e in entries:
        e.seq.num_computed_tokens = e.seq.num_tokens
        e.seq.append_token(7 * e.seq.seq_id + 1)
        e.num_new_tokens = 1
    decode_out = SchedulerOutput(scheduled=entries)

    kv_before = runner.cache_engine.kv.clone()
    inputs = runner.prepare_inputs(decode_out)
    with forward_context(inputs.attn_meta):
        flat = runner.model(inputs.input_ids, inputs.positions)
    kv_flat = runner.cache_engine.kv.clone()
    assert not torch.equal(kv_flat, kv_before)

    runner.cache_engine.kv.copy_(kv_before)
    mc = runner.config
    # A block table of 2048 tokens: wider than the short-context window of 1024.
    decode = DecodeRunner(runner.model, mc.scheduler.max_num_seqs, 2048, BLOCK, runner.device)
    # Stale values in the buffers must not matter: fill them with garbage first.
    decode.block_tables.fill_(63)
    decode.tokens.fill_(3)
    n, short = decode.prepare(entries)
    assert n == 5 and decode.padded_size(n) == 8 and short
    assert decode.tokens[2, 5:8].tolist() == [-1, -1, -1]  # padding writes nothing
    assert decode.seq_lens[5:8].tolist() == [0, 0, 0]
    padded = decode.run(n, short)
    torch.testing.assert_close(padded, flat, rtol=1e-5, atol=1e-5)
    assert decode._metadata(8, short).block_tables.shape == (8, 1024 // BLOCK)
    torch.testing.assert_close(runner.cache_engine.kv, kv_flat, rtol=0, atol=0)

    # A smaller batch reuses the buffers; rows of the previous step are now padding.
    runner.cache_engine.kv.copy_(kv_before)
    sub = SchedulerOutput(scheduled=entries[1:3])
    inputs = runner.prepare_inputs(sub)
    with forward_context(inputs.attn_meta):
        flat = runner.model(inputs.input_ids, inputs.positions)
    n, short = decode.prepare(sub.scheduled)
    assert decode.padded_size(n) == 2
    torch.testing.assert_close(decode.run(n, short), flat, rtol=1e-5, atol=1e-5)
    # The full-width window gives the same result as the short one.
    torch.testing.assert_close(decode.run(n, False), flat, rtol=1e-5, atol=1e-5)
