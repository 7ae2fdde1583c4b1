"""The C++ decoder stack (ops/cpu_decoder.py) against the module path it replaces: the engine
with the stack on and off gives the same tokens and bitwise-equal logprobs, through prompts,
chunked prefill, prefix-cache hits and decode, for Llama, Qwen2 (q/k/v bias) and Mistral (a
sliding window shorter than the prompts), with q4_1 weights (the C++ matmul), fp32 and bf16
weights (oneDNN through the Python callback); and the stack declines what it does not run."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.forward_context import AttentionMetadata, forward_context
from pagedllm.ops import cpu_decoder, fused, quant_linear

from ..conftest import SMALL_ENGINE

pytestmark = pytest.mark.skipif(not (quant_linear.load() and cpu_decoder._kernels()),
                                reason="no C++ CPU kernels")

VOCAB = 384
# head_dim 32: the attention kernel's AVX-512 task where the CPU has it, two query heads a KV head
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),  # q/k/v bias
    "mistral-window": (transformers.MistralForCausalLM, transformers.MistralConfig,
                       dict(sliding_window=12)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pagedllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path(), "gguf")
    made = {}

    def get(name: str) -> str:
        if name not in made:
            model_cls, config_cls, extra = FAMILIES[name]
            torch.manual_seed(0)
            model = model_cls(config_cls(**TINY, **extra)).eval()
            if name == "qwen2":  # random biases (HF initializes them to zero)
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                 layer.self_attn.v_proj):
                        proj.bias.data.normal_(0, 0.5)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            made[name] = str(path)
        return made[name]

    return get


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(3, VOCAB, (40,), generator=gen).tolist()
    # two share 32 tokens (two blocks) with the first: prefix-cache hits on the second pass
    return [base, base[:32] + [7, 8, 9], torch.randint(3, VOCAB, (5,), generator=gen).tolist(),
            torch.randint(3, VOCAB, (23,), generator=gen).tolist()]


def _run(llm: LLM, on: bool) -> list:
    cpu_decoder.set_enabled(on)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)
        outs = [llm.generate([{"prompt_token_ids": p} for p in _prompts()], params,
                             use_tqdm=False) for _ in range(2)]  # the second hits the cache
        alone = llm.generate([{"prompt_token_ids": _prompts()[3]}], params, use_tqdm=False)
    finally:
        cpu_decoder.set_enabled(True)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for out in outs + [alone]
            for o in out]


WEIGHTS = {"q4_1": dict(quantization="q4_1"), "fp32": {}, "bf16": dict(dtype="bfloat16")}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("chunk", [None, 16])
def test_stack_equals_the_module_path(checkpoint, family, chunk, weights, monkeypatch):
    extra = {} if chunk is None else dict(enable_chunked_prefill=True,
                                          max_num_batched_tokens=chunk)
    llm = LLM(checkpoint(family), seed=0, **WEIGHTS[weights], **SMALL_ENGINE, **extra)
    stacked = []
    call = cpu_decoder.DecoderStack.__call__

    def counted(self, positions, hidden):
        out = call(self, positions, hidden)
        stacked.append(out is not None)
        return out

    monkeypatch.setattr(cpu_decoder.DecoderStack, "__call__", counted)
    try:
        with_stack = _run(llm, True)
        ran = sum(stacked)
        without = _run(llm, False)
    finally:
        llm.shutdown()
    # every pass of the first run took the stack, prompts and chunks included; none of the second
    assert ran > 0 and stacked == [True] * ran + [False] * (len(stacked) - ran)
    assert [t for t, _ in with_stack] == [t for t, _ in without]
    assert [lp for _, lp in with_stack] == [lp for _, lp in without]  # bitwise


def test_stack_declines_what_it_does_not_run(checkpoint):
    """An int8 KV cache (scales the kernel does not take), or the fused layer ops turned off
    (the module path would run PyTorch's ops): the stack returns None and the modules run."""
    path = checkpoint("llama")
    prompt = [{"prompt_token_ids": _prompts()[0]}]
    params = SamplingParams(temperature=0.0, max_tokens=2)
    int8 = LLM(path, seed=0, kv_cache_dtype="int8", **SMALL_ENGINE)
    stack = int8.llm_engine.engine_core.executor.runner.model.model.cpu_stack
    int8.generate(prompt, params, use_tqdm=False)
    assert stack._table is None
    int8.shutdown()

    llm = LLM(path, quantization="q4_1", seed=0, **SMALL_ENGINE)
    stack = llm.llm_engine.engine_core.executor.runner.model.model.cpu_stack
    llm.generate(prompt, params, use_tqdm=False)
    assert stack._table is not None
    hidden = torch.zeros(1, 64)
    fused.set_enabled(False)
    try:
        assert stack(torch.zeros(1, dtype=torch.int64), hidden) is None
    finally:
        fused.set_enabled(True)
        llm.shutdown()


def test_stack_follows_weights_prepared_again(checkpoint):
    """Re-preparing the weights (q4_1 -> q8_0) rebuilds the stack's table: it then runs the new
    blocks, equal to the module path, never the freed old ones."""
    llm = LLM(checkpoint("llama"), quantization="q4_1", seed=0, **SMALL_ENGINE)
    model = llm.llm_engine.engine_core.executor.runner.model.model
    try:
        _run(llm, True)
        for module in model.modules():
            if hasattr(module, "prepack"):
                module.prepack("q8_0")
        with_stack = _run(llm, True)
        assert model.cpu_stack._table is not None
        assert model.cpu_stack._bound[-1] is model.layers[-1].mlp.down_proj.packed_weight
        assert with_stack == _run(llm, False)
    finally:
        llm.shutdown()


def test_stack_refuses_a_slot_past_the_cache(checkpoint):
    """A bad slot is the KV write's error, raised before anything is written."""
    llm = LLM(checkpoint("llama"), quantization="q4_1", seed=0, **SMALL_ENGINE)
    model = llm.llm_engine.engine_core.executor.runner.model.model
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=1), use_tqdm=False)
    cache = model.layers[0].self_attn.attn.kv_cache
    before = cache.clone()
    num_slots = cache.shape[1] * cache.shape[2]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([num_slots]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, max_seq_len=1)
    try:
        with forward_context(meta), pytest.raises(IndexError, match="past the cache"):
            model.cpu_stack(torch.zeros(1, dtype=torch.int64), torch.zeros(1, 64))
        assert torch.equal(cache, before)
        with forward_context(meta), pytest.raises(ValueError, match="2 positions for 1 tokens"):
            model.cpu_stack(torch.zeros(2, dtype=torch.int64), torch.zeros(1, 64))
    finally:
        llm.shutdown()


def test_a_dense_linear_that_raises_fails_its_pass_only(checkpoint, monkeypatch):
    """fp32 weights: an exception in a linear's forward (run by the stack's Python callback)
    is raised by the stack's call, as the module path would raise it, and the next pass runs
    the stack again."""
    llm = LLM(checkpoint("llama"), seed=0, **SMALL_ENGINE)
    model = llm.llm_engine.engine_core.executor.runner.model.model
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0]), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1, max_seq_len=1)
    positions, hidden = torch.zeros(1, dtype=torch.int64), torch.randn(1, 64)

    def boom(x):
        raise ValueError("boom")

    try:
        with forward_context(meta):
            before = model.cpu_stack(positions, hidden)
            assert before is not None
            monkeypatch.setattr(model.layers[1].mlp.down_proj, "forward", boom)
            with pytest.raises(ValueError, match="boom"):
                model.cpu_stack(positions, hidden)
            monkeypatch.undo()
            after = model.cpu_stack(positions, hidden)
        assert after is not None and all(map(torch.equal, before, after))
    finally:
        llm.shutdown()
