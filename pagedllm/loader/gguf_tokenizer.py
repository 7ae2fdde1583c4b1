"""A GGUF file's tokenizer (vocabulary, special tokens, chat template) as a fast HF tokenizer.

Built from the metadata with the `tokenizers` library alone (no transformers converter: those
live in transformers' private modules and move between releases). Two kinds of vocabulary:
  - byte-level BPE with merges (`tokenizer.ggml.model` "gpt2": SmolLM2, Qwen2, Llama 3): the
    text is split by the regexes llama.cpp names in `tokenizer.ggml.pre`, mapped to bytes, and
    merged by rank (`byte_level_backend`);
  - SentencePiece BPE with scores and no merges (`tokenizer.ggml.model` "llama": Gemma 3,
    Llama 2): llama.cpp tokenizes it by repeatedly merging the adjacent pair whose
    concatenation is in the vocabulary with the highest score. transformers' Gemma converter
    reads those scores as Unigram log-probabilities instead, which splits common words ("What"
    -> "Wh", "at"); `spm_bpe_backend` rebuilds the merges that the scores imply and gives
    llama.cpp's pieces.
"""

from __future__ import annotations

from gguf import TokenType

from pagedllm.loader.gguf import ARCHITECTURES, GGUFFile

# A chat template for files that carry none, in Gemma's documented turn format (llama.cpp falls
# back to the same built-in format): a system message is folded into the first user turn.
_GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set system = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set system.text = message['content'] | trim + '\\n\\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n'"
    " + system.text + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- set system.text = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
_DEFAULT_CHAT_TEMPLATES = {"gemma3": _GEMMA_CHAT_TEMPLATE}

# llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`, llama-vocab.cpp) as the regexes that split
# text before byte-level BPE, applied in order; each match is its own piece.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                 r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_PRE_TOKENIZER_SPLITS = {
    "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # SmolLM2: digits one by one, then GPT-2's split
    "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


def gguf_tokenizer(gguf: GGUFFile):
    """A fast tokenizer for the GGUF's vocabulary, with our special tokens.

    transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=...)` builds nearly the
    same byte-level backends (it skips SmolLM2's digit split, so a newline, two spaces and a
    digit tokenize differently) but (a) re-parses the file with GGUFReader twice (~9 s on the
    default model) and (b) in its llama converter swaps bos/eos, so SmolLM2's eos becomes
    `<|im_start|>` (id 1). Here the ids come straight from the metadata.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    md = gguf.metadata
    if gguf.arch not in ARCHITECTURES:
        raise ValueError(f"{gguf.path}: no tokenizer converter for GGUF architecture {gguf.arch!r}")
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{gguf.path} has no tokenizer in its metadata")
    tokens = md["tokenizer.ggml.tokens"]
    token_types = md.get("tokenizer.ggml.token_type", [])
    kind = md.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = byte_level_backend(tokens, md["tokenizer.ggml.merges"],
                                     md.get("tokenizer.ggml.pre"), str(gguf.path))
    elif kind == "llama" and "tokenizer.ggml.merges" not in md:
        # llama.cpp's default: a space in front of the text (and after each special token).
        backend = spm_bpe_backend(tokens, md["tokenizer.ggml.scores"], token_types,
                                  add_space_prefix=md.get("tokenizer.ggml.add_space_prefix",
                                                          gguf.arch != "gemma3"))
    else:
        raise ValueError(f"{gguf.path}: GGUF tokenizer model {kind!r} is not supported "
                         "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece scores)")

    # llama.cpp never splits CONTROL tokens (<|im_end|>, ...) or USER_DEFINED ones (Gemma's
    # runs of spaces and newlines); not every converter registers them all, so do it here
    # (re-adding one is a no-op).
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(token_types) if t == TokenType.CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(token_types) if t == TokenType.USER_DEFINED])

    def token(key: str) -> str | None:
        token_id = md.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=md.get("tokenizer.ggml.add_bos_token", False),
        add_eos_token=md.get("tokenizer.ggml.add_eos_token", False),
        chat_template=md.get("tokenizer.chat_template") or _DEFAULT_CHAT_TEMPLATES.get(gguf.arch),
        # NOTE: transformers asks for cleanup on byte-level GGUF vocabularies, which rewrites
        # " ," → "," when decoding; an engine that streams text wants decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )


def byte_level_backend(tokens: list[str], merges: list[str], pre: str | None,
                       where: str = "GGUF"):
    """A `tokenizers` byte-level BPE as llama.cpp runs it for `tokenizer.ggml.pre` = `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if pre not in _PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(_PRE_TOKENIZER_SPLITS))})")
    vocab = {piece: i for i, piece in enumerate(tokens)}
    # A byte-level piece never holds a literal space, so each merge is "left right".
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # Llama 3 looks a whole piece up before merging (llama.cpp's ignore_merges).
    backend = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre == "llama-bpe"))
    if pre == "qwen2":  # Qwen2's own tokenizer composes characters first
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def spm_bpe_backend(tokens: list[str], scores: list[float], token_types: list[int],
                    add_space_prefix: bool = False):
    """A `tokenizers` BPE that merges as llama.cpp's SPM tokenizer does.

    Every way of writing a NORMAL piece as two pieces of the vocabulary is a merge, ranked by
    the merged piece's score (higher first): BPE then applies the best-ranked merge among the
    adjacent pairs, as llama.cpp does. Spaces are "▁"; a character outside the vocabulary
    falls back to its UTF-8 bytes (<0x..> pieces); with `add_space_prefix` (Llama 2) a "▁" goes
    in front of the text, as llama.cpp adds it, and decoding takes it off again.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {piece: i for i, piece in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if token_types[i] != TokenType.NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right]))
    ranked.sort()
    merges = [(tokens[a], tokens[b]) for _, a, b in ranked]
    unk = next((p for i, p in enumerate(tokens) if token_types[i] == TokenType.UNKNOWN), None)
    backend = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
    replace = normalizers.Replace(" ", "▁")
    backend.normalizer = (normalizers.Sequence([normalizers.Prepend("▁"), replace])
                          if add_space_prefix else replace)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the space we put in front is not part of the text
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
