"""Token bitmasks (grammars, allowed_token_ids), logit_bias and bad_words, each against an
independent oracle: a Python loop over bits, the formula, a dense mask."""

from __future__ import annotations

import json

import pytest
import torch

from pagedllm.engine.structured_output import (
    bad_word_bans,
    grammar_text,
    token_ids_bitmask,
    validate,
)
from pagedllm.layers.sampler import Sampler, SamplingMetadata, apply_token_bitmask
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams


def build(params, banned=None, bitmask=None):
    n = len(params)
    return SamplingMetadata.build(params, [None] * n, [[]] * n, [[]] * n, banned, "cpu", bitmask)


def dense_from_bits(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The oracle: bit t % 32 of word t // 32, one Python test per token."""
    return torch.tensor([[bool((int(row[t // 32]) >> (t % 32)) & 1) if t // 32 < len(row)
                          else False for t in range(vocab_size)] for row in words])


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 100, 1000])
def test_bitmask_matches_a_bit_by_bit_oracle(vocab_size):
    g = torch.Generator().manual_seed(vocab_size)
    words = torch.randint(-2**31, 2**31, (3, (vocab_size + 31) // 32), generator=g,
                          dtype=torch.int64).to(torch.int32)
    logits = torch.randn(5, vocab_size, generator=g)
    rows = torch.tensor([4, 0, 2])
    out = apply_token_bitmask(logits.clone(), rows, words)
    allowed = dense_from_bits(words, vocab_size)
    for k, r in enumerate(rows.tolist()):
        expected = logits[r].masked_fill(~allowed[k], float("-inf"))
        assert torch.equal(out[r], expected)
    assert torch.equal(out[[1, 3]], logits[[1, 3]])  # other rows untouched


@pytest.mark.parametrize("vocab_size", [1, 33, 1000])
def test_bitmask_on_every_row_matches_the_oracle(vocab_size):
    """rows None (a batch of constrained requests): the one-pass path, same answer."""
    g = torch.Generator().manual_seed(vocab_size)
    words = torch.randint(-2**31, 2**31, (4, (vocab_size + 31) // 32), generator=g,
                          dtype=torch.int64).to(torch.int32)
    logits = torch.randn(4, vocab_size, generator=g)
    out = apply_token_bitmask(logits, None, words)
    assert torch.equal(out, logits.masked_fill(~dense_from_bits(words, vocab_size),
                                               float("-inf")))
    assert not torch.isinf(logits).any()  # a copy: the model's logits are not written


def test_bitmask_narrower_than_logits_disallows_the_rest():
    words = torch.tensor([[-1]], dtype=torch.int32)  # tokens 0..31 allowed
    out = apply_token_bitmask(torch.zeros(1, 40), torch.tensor([0]), words)
    assert torch.isinf(out[0, 32:]).all() and (out[0, :32] == 0).all()


@pytest.mark.parametrize("ids", [[0], [31, 32], [5, 63, 64, 99], list(range(100))])
def test_token_ids_bitmask_sets_exactly_those_bits(ids):
    allowed = dense_from_bits(token_ids_bitmask(ids, 100).unsqueeze(0), 100)[0]
    assert torch.nonzero(allowed).flatten().tolist() == sorted(ids)


def test_allowed_token_ids_and_logit_bias_in_the_sampler():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0]] * 3)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={0: 10.0}),
              SamplingParams(temperature=0, logit_bias={1: -3.5, 2: 2.5})]
    mask = token_ids_bitmask([2, 3], 5).unsqueeze(0)
    out = Sampler()(logits, build(params, bitmask=([0], mask)))
    # row 0: only 2 and 3 allowed -> 3; row 1: 0 + 10 wins; row 2: 1.5, 3.5 vs 3 -> token 2
    assert out.sampled_token_ids == [3, 0, 2]
    # random rows: a token outside allowed_token_ids is never drawn.
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(64)]
    mask = token_ids_bitmask([0, 4], 5).expand(64, -1).contiguous()
    out = Sampler()(torch.randn(64, 5), build(params, bitmask=(list(range(64)), mask)))
    assert set(out.sampled_token_ids) == {0, 4}


@pytest.mark.parametrize("output,expected", [
    ([], [7]),                 # one-token word: always banned; [1, 2, 3] needs [1, 2] first
    ([9, 1], [7]),             # [1, 2] not yet complete
    ([9, 1, 2], [7, 3]),       # ends with [1, 2]: 3 would complete [1, 2, 3]
    ([1, 2, 9], [7]),
])
def test_bad_word_bans(output, expected):
    assert bad_word_bans([[7], [1, 2, 3]], output) == expected


# ---- grammars -----------------------------------------------------------------------------
pytest.importorskip("llguidance")


def test_invalid_grammars_are_value_errors_naming_the_field():
    for so, field in [(StructuredOutputsParams(regex="[0-9"), "structured_outputs.regex"),
                      (StructuredOutputsParams(json={"type": "objectx"}),
                       "structured_outputs.json"),
                      (StructuredOutputsParams(grammar="start: foo("), "structured_outputs.grammar")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            validate(SamplingParams(structured_outputs=so))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


def test_grammar_text_is_cached_by_schema_not_key_order():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "string"}}})
    b = StructuredOutputsParams(json=json.dumps({"properties": {"x": {"type": "string"}},
                                                 "type": "object"}))
    assert grammar_text(a) is grammar_text(b)
    # ...but the order of properties is kept: it is the order the output writes them in.
    xy = {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "string"}}}
    yx = {"type": "object", "properties": {"y": {"type": "string"}, "x": {"type": "string"}}}
    assert grammar_text(StructuredOutputsParams(json=xy)) != grammar_text(
        StructuredOutputsParams(json=yx))


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_llguidance_sees_the_bytes_the_tokenizer_decodes(hf_tokenizer):
    """The GGUF-converted byte-level vocabulary (see ll_tokenizer's NOTE): every token's bytes
    as llguidance sees them equal the tokenizer's own decoding."""
    from pagedllm.engine.structured_output import ll_tokenizer

    llt = ll_tokenizer(hf_tokenizer)
    for t in range(len(hf_tokenizer)):
        text = hf_tokenizer.decode([t])
        if "\ufffd" not in text and not hf_tokenizer.convert_ids_to_tokens(t).startswith("<|"):
            assert llt.decode_bytes([t]) == text.encode(), t


def test_choice_matcher_with_n2_copies_is_independent(hf_tokenizer):
    import llguidance

    from pagedllm.engine.structured_output import StructuredOutputManager

    manager = StructuredOutputManager(lambda: hf_tokenizer, len(hf_tokenizer))
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    first = manager.compile(params).result(timeout=60)
    second = first.deep_copy()
    assert isinstance(first, llguidance.LLMatcher)
    masks = dense_from_bits(manager.fill_bitmask([first, second]), len(hf_tokenizer))
    assert torch.equal(masks[0], masks[1])
    allowed = {hf_tokenizer.decode([t]) for t in torch.nonzero(masks[0]).flatten().tolist()}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)
    assert first.consume_token(hf_tokenizer.encode("yes", add_special_tokens=False)[0])
    assert first.is_stopped() and not second.is_stopped()  # the copy did not advance
    manager.shutdown()
