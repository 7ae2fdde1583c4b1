"""Loaders against transformers: same config, same tensors (exactly), same tokenization.

The default GGUF is loaded once per module (ours and transformers'). transformers' GGUF path is
the slow part (~45 s of its GGUF parsing and name mapping), so the reference fixtures are
module-scoped and their tests marked `slow` (deselect with -m "not slow").
"""

from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

from pagedllm.loader import (
    default_model_path,
    initialize_dummy_weights,
    iter_weights,
    load_model_config,
    load_tokenizer,
    resolve_load_format,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand newlines ,  . ",
    "digits 1234567 and 3.14159",
    "unicode: héllo wörld — 日本語 🤖👍🏽",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # don't",
]
CHAT = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}]


# ---------------------------------------------------------------------------- default GGUF


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own GGUF load of the default model: (config, state dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dirname, basename = os.path.split(gguf_path)
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename,
                                                     dtype=torch.float32)
        return model.config, model.state_dict()
    # NOTE: from_pretrained refuses GGUF files without `accelerate`; for llama files it hands
    # them to load_gguf_checkpoint, called directly here (a meta model supplies the names).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(gguf_path))
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model,
                                  torch_dtype=torch.float32)
    return AutoConfig.for_model(**parsed["config"]), parsed["tensors"]


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    dirname, basename = os.path.split(gguf_path)
    return AutoTokenizer.from_pretrained(dirname, gguf_file=basename)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.mark.slow
def test_default_gguf_config_matches_transformers(gguf_path, reference):
    ours, ref = load_model_config(gguf_path).to_dict(), reference[0].to_dict()
    # Only names differ: transformers records general.name and an unk id; we add the class.
    # from_pretrained also records how it loaded (dtype, quantization_config).
    ignore = {"architectures", "_name_or_path", "_model_name_or_path", "unk_token_id", "dtype",
              "quantization_config"}
    assert {k: v for k, v in ours.items() if k not in ignore} == \
        {k: v for k, v in ref.items() if k not in ignore}
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"],
            ours["num_key_value_heads"], ours["head_dim"]) == (576, 30, 9, 3, 64)
    assert ours["tie_word_embeddings"] and ours["eos_token_id"] == 2
    assert resolve_load_format(gguf_path) == "gguf"


@pytest.mark.slow
def test_default_gguf_weights_match_transformers(gguf_path, reference):
    config, ref = load_model_config(gguf_path), reference[1]
    weights = iter_weights(gguf_path, "auto", config)
    assert isinstance(weights, types.GeneratorType)  # streamed, not a dict
    seen = set()
    for name, tensor in weights:  # compare one at a time: ours are never all in memory
        assert name in ref, name
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name
        seen.add(name)
    # Tied embeddings: no lm_head in the file (transformers' model may hold the tied copy).
    assert "lm_head.weight" not in seen
    assert seen == set(ref) - {"lm_head.weight"} and len(seen) == 272


@pytest.mark.slow
def test_default_gguf_tokenizer_matches_transformers(tokenizer, reference_tokenizer, gguf_path):
    ref = reference_tokenizer
    assert tokenizer.get_vocab() == ref.get_vocab()
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == ref(text).input_ids, text
        # NOTE: transformers' GGUF tokenizer cleans up spaces on decode (" ," → ","); ours
        # does not, so that decode(encode(text)) == text.
        assert tokenizer.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer("12").input_ids == [33, 34]  # SmolLM2 splits digits one by one
    assert tokenizer("<|im_end|>").input_ids == [2]  # special tokens are never split


@pytest.mark.slow
def test_default_gguf_chat_template_and_special_tokens(tokenizer, reference_tokenizer):
    ref = reference_tokenizer
    assert tokenizer.chat_template and tokenizer.chat_template == ref.chat_template
    for add_generation_prompt in (False, True):
        kwargs = dict(add_generation_prompt=add_generation_prompt)
        text = tokenizer.apply_chat_template(CHAT, tokenize=False, **kwargs)
        assert text == ref.apply_chat_template(CHAT, tokenize=False, **kwargs)
        assert tokenizer(text).input_ids == ref(text).input_ids
    assert text.endswith("<|im_start|>assistant\n")
    # From the GGUF metadata. transformers' llama GGUF converter swaps these and reports
    # <|im_start|> as eos, which would never stop a chat reply.
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (2, 0)
    ids = tokenizer("hi").input_ids  # the GGUF says add_bos_token=False
    assert ids == ref("hi").input_ids and len(ids) == 1 and ids[0] != tokenizer.bos_token_id


def test_tokenizer_directory_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.eos_token_id == tokenizer.eos_token_id == 2
    for text in TEXTS:
        assert loaded(text).input_ids == tokenizer(text).input_ids


# --------------------------------------------------------------------- safetensors directories


def _tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return AutoConfig.for_model(model_type, **(fields | overrides))


@pytest.mark.parametrize("arch,model_type,tied,shard", [
    ("LlamaForCausalLM", "llama", False, "30KB"),  # sharded: read through the index
    ("Qwen2ForCausalLM", "qwen2", True, None),     # q/k/v biases, tied embeddings
    ("MistralForCausalLM", "mistral", False, None),
])
def test_safetensors_directory_round_trip(tmp_path, arch, model_type, tied, shard):
    torch.manual_seed(0)
    config = _tiny_config(model_type, tie_word_embeddings=tied)
    model = getattr(transformers, arch)(config)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()

    ours = load_model_config(str(tmp_path))
    expected_config = model.config.to_dict() | {"architectures": [arch]}
    assert ours.to_dict() | {"_name_or_path": ""} == expected_config
    expected = model.state_dict()
    if tied:  # save_pretrained drops the tied copy; the model re-ties it
        del expected["lm_head.weight"]
    loaded = dict(iter_weights(str(tmp_path), "auto", ours))
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert resolve_load_format(str(tmp_path)) == "safetensors"


def test_dummy_format(tmp_path):
    config = _tiny_config("llama")
    config.save_pretrained(tmp_path)  # config.json only
    assert resolve_load_format(str(tmp_path), "dummy") == "dummy"
    assert load_model_config(str(tmp_path), "dummy").hidden_size == 64
    assert list(iter_weights(str(tmp_path), "dummy", config)) == []
    with pytest.raises(FileNotFoundError, match="dummy"):
        resolve_load_format(str(tmp_path))  # no weights: the error says how to go on

    model = transformers.LlamaForCausalLM(config)
    initialize_dummy_weights(model, seed=3)
    values = torch.cat([p.flatten() for p in model.parameters()])
    assert values.abs().max() <= 1e-3 and values.std() > 1e-4
    again = transformers.LlamaForCausalLM(config)
    initialize_dummy_weights(again, seed=3)
    assert torch.equal(values, torch.cat([p.flatten() for p in again.parameters()]))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="load_format"):
        load_model_config(str(tmp_path), "pt")
    with pytest.raises(FileNotFoundError, match="local"):
        load_model_config(str(tmp_path / "missing"))


# ------------------------------------------------------------- every GGUF tensor type we decode


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K rows (pairs interleaved)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(arch: str, gguf_name: str) -> int | None:
    """Heads whose rows llama.cpp permuted (llama only): 4 query, 2 kv heads in the tiny model."""
    if arch != "llama":
        return None
    return 4 if ".attn_q." in gguf_name else 2 if ".attn_k." in gguf_name else None


# HF name, GGUF name, shape, GGUF type, max |error| relative to max |value|
TINY_TENSORS = [
    ("model.embed_tokens.weight", "token_embd.weight", (128, 64), "Q8_0", 1 / 200),
    ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", (64,), "F32", 0),
    ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", (64, 64), "Q4_0", 1 / 7),
    ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", (32, 64), "Q4_1", 1 / 14),
    ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", (32, 64), "F16", 1e-3),
    ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", (64, 64), "BF16",
     1 / 128),
    ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight", (64,), "F32", 0),
    ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight", (128, 64), "Q8_0", 1 / 200),
    ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", (128, 64), "Q4_0", 1 / 7),
    ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", (64, 128), "Q4_1", 1 / 14),
    ("model.norm.weight", "output_norm.weight", (64,), "F32", 0),
    ("lm_head.weight", "output.weight", (128, 64), "Q8_0", 1 / 200),
]
QWEN2_BIASES = [  # qwen2 adds q/k/v biases, which llama.cpp does not permute either
    (f"model.layers.0.self_attn.{x}_proj.bias", f"blk.0.attn_{x}.bias", (n,), "F32", 0)
    for x, n in (("q", 64), ("k", 32), ("v", 32))
]


def _tiny_tensors(arch: str) -> list[tuple]:
    return TINY_TENSORS + (QWEN2_BIASES if arch == "qwen2" else [])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    """A one-layer GGUF holding every supported tensor type: (arch, path, HF originals)."""
    arch = request.param
    path = str(tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf")
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    if arch == "llama":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)  # stored as the string "linear"
        writer.add_rope_scaling_factor(2.0)
    rng = np.random.default_rng(0)
    originals = {}
    for hf_name, gguf_name, shape, type_name, _ in _tiny_tensors(arch):
        hf = rng.standard_normal(shape).astype(np.float32)
        originals[hf_name] = hf
        heads = _rope_heads(arch, gguf_name)
        stored = _permute(hf, heads) if heads else hf
        qtype = GGMLQuantizationType[type_name]
        writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch, path, originals


def test_tiny_gguf_config(tiny_gguf):
    arch, path, _ = tiny_gguf
    config = load_model_config(path)
    assert config.model_type == arch and not config.tie_word_embeddings
    assert config.architectures == [{"llama": "LlamaForCausalLM",
                                     "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 1)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.vocab_size == 128 and config.max_position_embeddings == 256
    assert config.rms_norm_eps == pytest.approx(1e-6)
    rope = config.rope_parameters
    assert rope["rope_theta"] == 500000.0
    if arch == "llama":
        assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)
    else:
        assert rope["rope_type"] == "default"


def test_tiny_gguf_every_tensor_type(tiny_gguf):
    arch, path, originals = tiny_gguf
    config = load_model_config(path)
    loaded = dict(iter_weights(path, "gguf", config))
    assert loaded.keys() == originals.keys()
    native = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for hf_name, gguf_name, shape, type_name, rel_err in _tiny_tensors(arch):
        tensor, original = loaded[hf_name], originals[hf_name]
        qtype = GGMLQuantizationType[type_name]
        assert tensor.shape == shape and tensor.dtype == native.get(type_name, torch.float32)
        # Exactly the gguf package's de-quantization of the stored rows, un-permuted ...
        heads = _rope_heads(arch, gguf_name)
        stored = _permute(original, heads) if heads else original
        expected = dequantize(quantize(stored, qtype), qtype)
        expected = _unpermute(expected, heads) if heads else expected
        np.testing.assert_array_equal(tensor.float().numpy(), expected, err_msg=hf_name)
        # ... and the original values within that type's rounding error.
        err = np.abs(tensor.float().numpy() - original).max()
        assert err <= rel_err * np.abs(original).max(), (hf_name, err)
