"""A GGUF file's tokenizer (vocabulary, special tokens, chat template) as a fast HF tokenizer.

Two kinds of vocabulary reach us:
  - byte-level BPE with merges (`tokenizer.ggml.model` "gpt2": SmolLM2, Qwen2): transformers'
    GGUF converters build it;
  - SentencePiece BPE with scores and no merges (`tokenizer.ggml.model` "llama" on Gemma 3):
    llama.cpp tokenizes it by repeatedly merging the adjacent pair whose concatenation is in the
    vocabulary with the highest score. transformers' Gemma converter reads those scores as
    Unigram log-probabilities instead, which splits common words ("What" -> "Wh", "at");
    `spm_bpe_backend` rebuilds the merges that the scores imply and gives llama.cpp's pieces.
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


def gguf_tokenizer(gguf: GGUFFile):
    """A fast tokenizer for the GGUF's vocabulary, with our special tokens.

    transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=...)` builds the byte-level
    backends the same way but (a) re-parses the file with GGUFReader twice (~9 s on the default
    model) and (b) in its llama converter swaps bos/eos, so SmolLM2's eos becomes `<|im_start|>`
    (id 1). Here the ids come straight from the metadata.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    md = gguf.metadata
    if gguf.arch not in ARCHITECTURES:
        raise ValueError(f"{gguf.path}: no tokenizer converter for GGUF architecture {gguf.arch!r}")
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{gguf.path} has no tokenizer in its metadata")
    tokens = md["tokenizer.ggml.tokens"]
    token_types = md.get("tokenizer.ggml.token_type", [])
    if md.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in md \
            and gguf.arch == "gemma3":
        backend = spm_bpe_backend(tokens, md["tokenizer.ggml.scores"], token_types)
    else:
        tokenizer_dict = {hf_key: md[f"tokenizer.{key}"]
                          for key, hf_key in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                          if f"tokenizer.{key}" in md}
        backend, _ = convert_gguf_tokenizer(ARCHITECTURES[gguf.arch][0], tokenizer_dict)

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


def spm_bpe_backend(tokens: list[str], scores: list[float], token_types: list[int]):
    """A `tokenizers` BPE that merges as llama.cpp's SPM tokenizer does.

    Every way of writing a NORMAL piece as two pieces of the vocabulary is a merge, ranked by
    the merged piece's score (higher first): BPE then applies the best-ranked merge among the
    adjacent pairs, as llama.cpp does. Spaces are "▁"; a character outside the vocabulary
    falls back to its UTF-8 bytes (<0x..> pieces); nothing is added in front of the text.
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
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend
