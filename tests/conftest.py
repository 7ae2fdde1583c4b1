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
