"""GGUF tokenizers built with `tokenizers` alone (loader/gguf_tokenizer.py), against
independent pipelines: SmolLM2's own tokenizer.json recipe (individual digits, then GPT-2's
byte-level split), transformers' Qwen2 GGUF converter (where this transformers has one), and a
hand-made SentencePiece vocabulary. The default model against transformers' GGUF tokenizer is
tests/loader/test_loaders.py (slow)."""

from __future__ import annotations

import os

import pytest
from gguf import TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from pagedllm.loader import default_model_path
from pagedllm.loader.gguf import read_gguf
from pagedllm.loader.gguf_tokenizer import byte_level_backend, spm_bpe_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "Hello world!", "digits 1234567 and 3.14159, x1y22", "  leading spaces,\ttabs\n\n  3 and ,",
    "unicode: héllo wörld — 日本語 🤖👍🏽 ١٢٣ ½", "def f(x):\n    return x ** 2  # don't",
    "CAPS'LL 'VE I'M\r\n\r\n  \t end  ",
]


@pytest.fixture(scope="module")
def vocab():
    try:
        md = read_gguf(default_model_path()).metadata
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        texts = TEXTS + [f.read()]
    return md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"], texts


def test_smollm_split_is_smollm2s_own_pipeline(vocab):
    """SmolLM2's tokenizer.json: Digits(individual) then ByteLevel with GPT-2's regex. (The
    transformers GGUF converter skips the digit split: "\\n  3" differs there.)"""
    tokens, merges, texts = vocab
    ref = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ours = byte_level_backend(tokens, merges, "smollm")
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text).ids, text[:60]
        assert ours.decode(ids) == text
    assert ours.encode("\n  3").ids == ref.encode("\n  3").ids


def test_qwen2_split_matches_transformers_converter(vocab):
    """SmolLM2's vocabulary under Qwen2's pre-tokenizer, against transformers' Qwen2 GGUF
    converter (a test-only use of its internals; skipped where they moved)."""
    try:
        from transformers.integrations.ggml import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers has no GGUF converters to compare with")
    tokens, merges, texts = vocab
    ref, _ = convert_gguf_tokenizer("qwen2", {"tokens": tokens, "merges": merges})
    ours = byte_level_backend(tokens, merges, "qwen2")
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == \
            ref.encode(text, add_special_tokens=False).ids, text[:60]


def test_unknown_pre_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="pre-tokenizer 'nope' is not supported"):
        byte_level_backend(["a"], [], "nope")


def test_spm_scores_with_and_without_a_space_prefix():
    """Hand-made vocabulary: the best-scored merges win, "▁" is the space, and Llama 2's space
    prefix goes in front of the text and comes off when decoding."""
    pieces = ["<unk>", "▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "lo"]
    scores = [0, -1, -1, -1, -1, -1, -2, -2, -3, -4, -5, -2.5]
    types = [TokenType.UNKNOWN] + [TokenType.NORMAL] * (len(pieces) - 1)
    ids = {p: i for i, p in enumerate(pieces)}
    plain = spm_bpe_backend(pieces, scores, types)
    assert plain.encode("hello hello").ids == [ids["hello"], ids["▁hello"]]
    prefixed = spm_bpe_backend(pieces, scores, types, add_space_prefix=True)
    assert prefixed.encode("hello").ids == [ids["▁hello"]]
    assert prefixed.decode(prefixed.encode("hello hello").ids) == "hello hello"
