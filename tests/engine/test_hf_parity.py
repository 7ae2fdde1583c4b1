"""Greedy token ids equal HF transformers `generate` on the same weights.

The HF side runs each prompt alone (no padding), so it is the plain reference computation;
our engine runs all prompts in one continuous batch.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.loader import default_model_path, iter_weights, load_model_config

from ..conftest import SMALL_ENGINE


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def ours_greedy(llm: LLM, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_same(hf: list[list[int]], ours: list[list[int]]) -> None:
    for i, (a, b) in enumerate(zip(hf, ours)):
        assert a == b, f"prompt {i}: HF {a} != ours {b}"


def test_default_gguf_model_matches_hf_on_a_batch_of_chat_prompts(default_llm, chat_prompt_ids):
    """SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to fp32) - 8 chat prompts, 32 tokens.

    HF's model is built from the same config and the tensors our GGUF loader yields
    (tests/loader proves those equal transformers' own GGUF loading, tensor for tensor).
    """
    path = default_model_path()
    config = load_model_config(path, "gguf")
    hf = transformers.LlamaForCausalLM(config).eval()
    state = dict(iter_weights(path, "gguf", config))
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, state["model.embed_tokens.weight"])
    prompts = chat_prompt_ids[:8]
    expected = hf_greedy(hf, prompts, 32)
    assert_same(expected, ours_greedy(default_llm, prompts, 32))
    # The eos token ends HF's generation; ours stops at the same place.
    assert any(len(e) < 32 for e in expected) or all(len(e) == 32 for e in expected)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152,
            initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, default_tokenizer):
    """Tiny random Llama and Qwen2 checkpoints saved as safetensors by transformers itself."""
    made = {}
    for name, cfg_cls, model_cls, extra in [
        ("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM,
         dict(rope_theta=10000.0, tie_word_embeddings=False)),
        ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
         dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    ]:
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**TINY, **extra)).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        default_tokenizer.save_pretrained(path)
        made[name] = (str(path), model)
    return made


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_random_models_match_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 17, 33, 64)]
    expected = hf_greedy(hf, prompts, 24)
    llm = LLM(path, **SMALL_ENGINE)
    assert_same(expected, ours_greedy(llm, prompts, 24, ignore_eos=True)
                if all(len(e) == 24 for e in expected) else ours_greedy(llm, prompts, 24))
