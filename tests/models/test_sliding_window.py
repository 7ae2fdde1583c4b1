"""Sliding-window attention through the whole engine, against HF transformers.

Tiny random checkpoints saved by transformers (hidden 64, window 32 tokens, block size 16),
prompts longer than the window: every decode step and every prefill chunk past the first 32
tokens reads a window, not the whole context.
  - Mistral: every layer slides, so the block manager frees blocks that leave the window
    (their table entries become -1) and prefix caching is off;
  - Gemma 3: sliding and global layers interleaved (hybrid): every block is kept.
Greedy tokens must equal HF `generate`, and the top-5 logprobs of every step HF's own to fp32
rounding. HF runs each prompt alone (no padding); we run them as one continuous batch.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams

from ..conftest import SMALL_ENGINE

WINDOW, BLOCK_SIZE, NEW_TOKENS = 32, 16, 20
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, vocab_size=49152, initializer_range=0.2,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, sliding_window=WINDOW,
              tie_word_embeddings=False)


def tiny_configs():
    return {
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(
            num_hidden_layers=2, rope_theta=10000.0, **COMMON)),
        # Global layers with linear RoPE scaling, a query scale that is not head_dim and
        # soft-capped final logits: each choice shows up in the logprobs if it is wrong.
        "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=24, final_logit_softcapping=3.0, pad_token_id=0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
            **COMMON)),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from pagedllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path(), "gguf")
    made = {}
    for name, (model_cls, config) in tiny_configs().items():
        torch.manual_seed(0)
        model = model_cls(config).eval()
        with torch.no_grad():  # Gemma's norms start at 0 (scale 1 + 0): make (1 + w) matter
            for pname, param in model.named_parameters():
                if "norm" in pname:
                    param.normal_(0.0, 0.3)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        made[name] = (str(path), model)
    return made


def prompts() -> list[list[int]]:
    # Shorter than the window, one past it, and two spanning several windows.
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (9, 33, 70, 101)]


@pytest.fixture(scope="module")
def expected(checkpoints):
    """HF's greedy tokens and per-step logprobs for each arch and prompt (computed once)."""
    cache = {}

    def get(arch: str) -> list[tuple[list[int], torch.Tensor]]:
        if arch not in cache:
            cache[arch] = [hf_greedy(checkpoints[arch][1], ids) for ids in prompts()]
        return cache[arch]

    return get


def hf_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """(new tokens, log-softmax of each step's logits [steps, vocab])."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).float().log_softmax(-1)


def ours_greedy(llm: LLM, batch: list[list[int]], logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_prompts_longer_than_the_window_match_hf(checkpoints, expected, arch):
    path, _ = checkpoints[arch]
    batch = prompts()
    llm = LLM(path, block_size=BLOCK_SIZE, **SMALL_ENGINE)
    bm = llm.llm_engine.engine_core.block_manager
    if arch == "mistral":  # every layer slides: blocks behind the window are freed
        assert bm.sliding_window == WINDOW and not bm.pool.enable_caching
    else:  # hybrid: the global layers need every block, the prefix cache stays on
        assert bm.sliding_window is None and bm.pool.enable_caching
    for i, (out, (tokens, hf_logprobs)) in enumerate(zip(ours_greedy(llm, batch, 5),
                                                         expected(arch))):
        assert out.token_ids == tokens, f"prompt {i} ({len(batch[i])} tokens)"
        for step, position in enumerate(out.logprobs):
            ids = list(position)
            ours = torch.tensor([position[t].logprob for t in ids])
            torch.testing.assert_close(ours, hf_logprobs[step, ids], rtol=0, atol=2e-4)
    llm.shutdown()


def test_mistral_chunked_prefill_over_freed_blocks(checkpoints, expected):
    """16-token chunks: later chunks start past blocks the window has already freed, and
    decode rows share steps with prefill chunks (the prefill path with a window)."""
    llm = LLM(checkpoints["mistral"][0], block_size=BLOCK_SIZE, max_num_batched_tokens=16,
              max_num_seqs=4, **SMALL_ENGINE)
    outs = ours_greedy(llm, prompts())
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in expected("mistral")]
    llm.shutdown()


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_tensor_parallel_2_matches_hf(checkpoints, expected, arch):
    """TP=2 (two ranks over gloo): the window, Gemma's per-head q/k norms and its scaled
    query split by heads, and the tokens stay HF's."""
    llm = LLM(checkpoints[arch][0], block_size=BLOCK_SIZE, tensor_parallel_size=2,
              **SMALL_ENGINE)
    try:
        outs = ours_greedy(llm, prompts())
    finally:
        llm.shutdown()
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in expected(arch)]
