"""The CUDA path's bookkeeping (worker/cuda_graph.py), checked on CPU.

The engine uses CudaGraphRunner on CUDA only, but its input layout (padding rows and tokens,
slots, ragged block tables written into static buffers) is plain indexing: run eagerly on a CPU
device (the PyTorch twins) it must give the same hidden states and the same KV-cache writes as
the flat batch of prepare_inputs, whose arrays it copies. (fp32 GEMMs of another row count may
round differently, hence a tolerance on hidden states; the KV writes of the padded rows are
checked exactly: none.)
"""

from __future__ import annotations

import json

import pytest
import torch

from pagedllm.core.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.core.sequence import PLACEHOLDER_TOKEN_ID, Sequence, SequenceGroup
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.forward_context import forward_context
from pagedllm.ops.triton.paged_prefill import prefill_block_m
from pagedllm.worker import cuda_graph
from pagedllm.worker.cuda_graph import CudaGraphRunner, StepShape, capture_sizes, token_buckets
from pagedllm.worker.flat_batch import build_flat_batch
from pagedllm.worker.model_runner import ModelRunner

BLOCK = 16


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(4096)[-1] == 512


def test_token_buckets():
    assert token_buckets(8192) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280,
                                   1536, 1792, 2048]
    assert token_buckets(2048) == token_buckets(8192)
    assert token_buckets(64) == [16, 32, 64]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(5) == [5]


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
    assert runner.graph_runner is None  # CPU engines never take the CUDA path
    return runner


def make_runner(runner, max_num_batched_tokens: int = 8192, max_model_len: int = 2048):
    # A block table of 2048 tokens: wider than the short-context window of 1024.
    graphs = CudaGraphRunner(runner.model, runner.config.scheduler.max_num_seqs,
                             max_num_batched_tokens, max_model_len, BLOCK, runner.device)
    # Stale values in the buffers must not matter: fill them with garbage first.
    graphs.block_tables.fill_(63)
    graphs._tokens.fill_(3)
    graphs.seq_lens.fill_(5)
    return graphs


def make_seqs(lengths: list[int], seed: int = 0) -> list[ScheduledSeq]:
    """Sequences with shuffled, non-contiguous block ids, prefill not yet run."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(64, generator=gen).tolist()
    entries = []
    for i, n in enumerate(lengths):
        seq = Sequence(i, torch.randint(0, 512, (n,), generator=gen).tolist())
        blocks = [free.pop() for _ in range(-(-(n + 1) // BLOCK))]
        group = SequenceGroup(str(i), [seq], params=None)
        entries.append(ScheduledSeq(seq, group, n, blocks))
    return entries


def graph_inputs(graphs, entries, sample_from=None):
    """The graph runner's inputs: the one flat batch, copied into its buffers."""
    return graphs.prepare(build_flat_batch(entries, BLOCK, sample_from))


def flat_forward(runner, out: SchedulerOutput) -> torch.Tensor:
    inputs = runner.prepare_inputs(out)
    with forward_context(inputs.attn_meta):
        return runner.model(inputs.input_ids, inputs.positions)


def written_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Cache slots whose K or V changed in any layer. kv: [L, 2, N, B, Hkv, D]."""
    changed = (before != after).flatten(-2).any(-1)  # [L, 2, N, B]
    return set(changed.any(0).any(0).flatten().nonzero().flatten().tolist())


def real_slots(entries) -> set[int]:
    slots = set()
    for e in entries:
        p = e.seq.num_computed_tokens
        for pos in range(p, p + e.num_new_tokens):
            slots.add(e.block_ids[pos // BLOCK] * BLOCK + pos % BLOCK)
    return slots


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
    flat = flat_forward(runner, decode_out)
    kv_flat = runner.cache_engine.kv.clone()
    assert not torch.equal(kv_flat, kv_before)

    runner.cache_engine.kv.copy_(kv_before)
    graphs = make_runner(runner)
    step = graph_inputs(graphs, entries)
    assert step.shape == StepShape(8, 8, decode=True, short=True)
    assert (step.num_tokens, step.num_seqs, step.logits_indices) == (5, 5, None)
    assert graphs._token_rows(8)[2, 5:].tolist() == [-1, -1, -1]  # padding writes nothing
    assert graphs.seq_lens[5:8].tolist() == [0, 0, 0]
    padded = graphs.run(step)
    assert padded.shape[0] == 8
    torch.testing.assert_close(padded[:5], flat, rtol=1e-5, atol=1e-5)
    assert graphs._metadata(step.shape).block_tables.shape == (8, 1024 // BLOCK)
    torch.testing.assert_close(runner.cache_engine.kv, kv_flat, rtol=0, atol=0)

    # A smaller batch reuses the buffers; rows of the previous step are now padding.
    runner.cache_engine.kv.copy_(kv_before)
    sub = SchedulerOutput(scheduled=entries[1:3])
    flat = flat_forward(runner, sub)
    step = graph_inputs(graphs, sub.scheduled, [1, 1, 0])  # rows to sample, one of them twice
    assert step.shape.num_tokens == 2 and step.logits_indices.tolist() == [1, 1, 0]
    torch.testing.assert_close(graphs.run(step)[:2], flat, rtol=1e-5, atol=1e-5)
    # The full-width window gives the same result as the short one.
    wide = step.shape._replace(short=False)
    torch.testing.assert_close(graphs._forward(wide)[:2], flat, rtol=1e-5, atol=1e-5)


def test_padded_mixed_step_equals_the_flat_batch(runner):
    """Decode rows, a chunk in the middle of a prompt (an earlier chunk or a prefix-cache hit
    is in the cache) and whole prompts, in one step padded to a token bucket."""
    entries = make_seqs([30, 9, 50, 17, 2, 25], seed=1)
    # Write the first part of every prompt into the cache, flat.
    done = [29, 8, 20, 0, 0, 16]  # decode, decode, chunk after 20 cached, prompt, prompt, chunk
    first = [ScheduledSeq(e.seq, e.group, k, e.block_ids) for e, k in zip(entries, done) if k]
    runner.execute(SchedulerOutput(scheduled=first), None)
    for e, k in zip(entries, done):
        e.seq.num_computed_tokens = k
        e.num_new_tokens = e.seq.num_tokens - k
    entries[5].num_new_tokens = 4  # a chunk that stops before the end of its prompt
    out = SchedulerOutput(scheduled=entries)
    t = sum(e.num_new_tokens for e in entries)
    assert t == 1 + 1 + 30 + 17 + 2 + 4

    kv_before = runner.cache_engine.kv.clone()
    flat = flat_forward(runner, out)
    kv_flat = runner.cache_engine.kv.clone()
    runner.cache_engine.kv.copy_(kv_before)

    graphs = make_runner(runner)
    rows = [0, 1, 2, 3, 4, 4]  # entry 5 does not sample; entry 4 samples twice (n = 2)
    step = graph_inputs(graphs, entries, rows)
    T, S = step.shape.num_tokens, step.shape.num_seqs
    assert (T, step.shape.decode) == (64, False) and step.num_tokens == t
    # Padded rows keep the flat batch's tile size: 55 tokens over 6 rows with a group of 2.
    assert S >= 6 and prefill_block_m(T, S, 2) == prefill_block_m(t, 6, 2)
    last = [0, 1, 31, 48, 50, 54]  # each entry's last token's row
    assert step.logits_indices.tolist() == [last[i] for i in rows]
    tokens = graphs._token_rows(T)
    assert tokens[0, t:].eq(0).all() and tokens[1, t:].eq(0).all()
    assert tokens[2, t:].eq(-1).all()
    assert graphs.query_start_loc[:S + 1].tolist() == [0, 1, 2, 32, 49, 51, 55] + [55] * (S - 6)
    assert graphs.seq_lens[:S].tolist() == [30, 9, 50, 17, 2, 20] + [0] * (S - 6)

    hidden = graphs.run(step)
    assert hidden.shape[0] == T
    torch.testing.assert_close(hidden[:t], flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[step.logits_indices], flat[[last[i] for i in rows]])
    # Exactly the real tokens' slots were written: the padding wrote nothing.
    kv_padded = runner.cache_engine.kv.clone()
    assert written_slots(kv_before, kv_padded) == real_slots(entries)
    torch.testing.assert_close(kv_padded, kv_flat, rtol=1e-5, atol=1e-5)

    # Through the model runner: the same sampled rows and prompt logprobs as the flat path.
    runner.cache_engine.kv.copy_(kv_before)
    flat_hidden, flat_sampled = runner._forward(runner.plan_step(out, None, rows).batch, [])
    _, flat_plp = runner.execute(out, None, {2: 3, 5: 3}, rows)
    runner.graph_runner = graphs
    try:
        runner.cache_engine.kv.copy_(kv_before)
        hidden, sampled = runner._forward(runner.plan_step(out, None, rows).batch, [])
        runner.cache_engine.kv.copy_(kv_before)
        _, plp = runner.execute(out, None, {2: 3, 5: 3}, rows)
    finally:
        runner.graph_runner = None
    assert hidden.shape == flat_hidden.shape == (t, 64)
    torch.testing.assert_close(sampled, flat_sampled, rtol=1e-5, atol=1e-5)
    assert plp.keys() == flat_plp.keys() == {2, 5}
    for k in plp:
        assert plp[k][0] == flat_plp[k][0]
        assert len(plp[k][1]) == len(flat_plp[k][1]) > 0


def test_padded_rows_keep_the_tile_size():
    """Every (tokens, rows) a step can have: the padded graph gets the flat batch's tiles,
    or (when padding alone makes rows longer) the bucket's smallest ones, at its most rows."""
    model = torch.nn.Module()
    for group in (1, 4, 8):
        model.attn = cuda_graph.Attention(4 * group, 64, 4, 1.0)
        graphs = CudaGraphRunner(model, 256, 8192, 2048, BLOCK, torch.device("cpu"))
        shapes = set(graphs.graph_shapes())
        for t in list(range(2, 300)) + list(range(300, 2049, 37)):
            bucket = graphs.token_bucket(t)
            for n in sorted({1, 2, 3, 7, 8, 9, 31, 33, 100, 255, 256} & set(range(1, t + 1))):
                s = graphs._padded_rows(bucket, t, n)
                assert StepShape(bucket, s, False, False) in shapes
                want, got = prefill_block_m(t, n, group), prefill_block_m(bucket, s, group)
                assert s >= n and (got == want or (got > want and s == min(bucket, 256)))
    assert graphs.token_bucket(2049) is None
    mixed = [s for s in graphs.graph_shapes() if not s.decode]
    assert len(mixed) <= 3 * len(graphs.buckets)


def test_steps_that_do_not_fit(runner, monkeypatch):
    entries = make_seqs([30, 9, 50, 17], seed=2)
    out = SchedulerOutput(scheduled=entries)
    # Too many tokens for the buffers: the flat path (the model runner checks can_run).
    batch = build_flat_batch(entries, BLOCK)
    assert not make_runner(runner, max_num_batched_tokens=64).can_run(batch)
    assert make_runner(runner, max_num_batched_tokens=106).can_run(batch)
    # Too many rows.
    many, few = (build_flat_batch(make_seqs([1] * k, seed=3), BLOCK) for k in (17, 16))
    assert not make_runner(runner).can_run(many) and make_runner(runner).can_run(few)
    # More tokens than the largest graph: eager on the same buffers, unpadded.
    monkeypatch.setattr(cuda_graph, "MAX_GRAPH_TOKENS", 64)
    graphs = make_runner(runner, max_num_batched_tokens=128)
    assert graphs.buckets == [16, 32, 64]
    flat = flat_forward(runner, out)
    step = graph_inputs(graphs, entries)
    assert step.shape == StepShape(106, 4, decode=False, short=False)
    torch.testing.assert_close(graphs.run(step), flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3], ids=["decode", "mixed"])
def test_tokens_fed_from_the_device_reach_every_path(runner, chunk):
    """Async scheduling: an input token still a placeholder on the host is the previous step's
    sampled row, copied on the device after the upload; the flat batch, the graph buffers and
    the host feed of tp > 1 must all run the real token. chunk 3: the last entry re-runs its
    last 3 tokens (a mixed step), the fed one last, as after a recompute preemption."""
    entries = make_seqs([5, 12, 20], seed=4)
    runner.execute(SchedulerOutput(scheduled=entries), None)  # the prompts, in the cache
    for e, token in zip(entries, [11, 22, 33]):
        e.seq.num_computed_tokens = e.seq.num_tokens
        e.seq.append_token(token)
        e.num_new_tokens = 1
    entries[2].seq.num_computed_tokens -= chunk - 1
    entries[2].num_new_tokens = chunk
    out = SchedulerOutput(scheduled=entries)
    kv_before = runner.cache_engine.kv.clone()
    _, want = runner._forward(runner.plan_step(out, None).batch, [])
    real = runner.plan_step(out, None).batch.input_ids.copy()

    for e in entries[1:]:
        e.seq.token_ids[-1] = PLACEHOLDER_TOKEN_ID
    runner._last_sampled = torch.tensor([33, 99, 22])  # the previous step's rows
    from_device = [(1, 0, 2), (2, chunk - 1, 0)]  # (entry, offset in its chunk, row)
    plan = runner.plan_step(out, None)
    assert (plan.batch.input_ids == PLACEHOLDER_TOKEN_ID).sum() == 2
    for graphs in (None, make_runner(runner)):
        runner.graph_runner = graphs
        try:
            runner.cache_engine.kv.copy_(kv_before)
            _, got = runner._forward(runner.plan_step(out, None).batch, from_device)
        finally:
            runner.graph_runner = None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    runner.feed_on_host(plan, from_device)
    assert plan.batch.input_ids.tolist() == real.tolist()
