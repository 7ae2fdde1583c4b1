"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels bind to the interpreter when they are decorated, so TRITON_INTERPRET must be
# set before any test module imports them (engine tests import ops.backend too). On a CPU the
# engine itself never runs Triton, so this only affects the kernel tests in tests/ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI has 2 cores; pin the thread count so results do not depend on the machine.
torch.set_num_threads(int(os.environ.get("PAGEDLLM_TEST_THREADS", "2")))

# Small KV caches: tests never need the 2 GiB default, and many engines are built.
SMALL_ENGINE = dict(cpu_kv_cache_gib=0.25, swap_space=0.25)


@pytest.fixture(scope="session")
def default_llm():
    from pagedllm import LLM

    return LLM(**SMALL_ENGINE)


@pytest.fixture(scope="session")
def default_tokenizer(default_llm):
    return default_llm.get_tokenizer()


CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Give me a tip for learning to code.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Name a famous mountain.",
    "What does a compiler do?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Tell me a short joke.",
]


@pytest.fixture(scope="session")
def chat_prompt_ids(default_llm):
    """Token ids of the chat-templated questions (different lengths, shared template)."""
    return [default_llm.encode_chat([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]


# A model that costs almost nothing to run (2 layers, hidden 64), with the default tokenizer:
# for tests of processes, protocols and frontends rather than of the model.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  vocab_size=49152, initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint saved by transformers, with SmolLM2's tokenizer."""
    import transformers

    from pagedllm.loader import default_model_path, load_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer(default_model_path(), "gguf").save_pretrained(path)
    return str(path)
