"""Configs that ask for math a family does not implement are refused at load, naming the field
and its value; the configs the engine already runs keep loading."""

from __future__ import annotations

import json
import re

import pytest
import transformers

from pagedllm import LLM
from pagedllm.models.registry import get_model_class

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=384,
             max_position_embeddings=256)
GQA = dict(SMALL, intermediate_size=128, num_key_value_heads=2)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                long_factor=[2.0] * 8, original_max_position_embeddings=128)

REFUSED = [
    # (config, max_model_len, what the error must name)
    (transformers.LlamaConfig(**GQA, hidden_act="gelu"), None, "hidden_act='gelu'"),
    (transformers.OPTConfig(**SMALL, activation_function="silu"), None,
     "activation_function='silu'"),
    (transformers.LlamaConfig(**GQA, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                       original_max_position_embeddings=64)),
     None, "rope_parameters.rope_type='yarn'"),
    (transformers.Phi3Config(**GQA, rope_scaling=LONGROPE), None,
     "rope_parameters.rope_type='longrope'"),
    # per layer type (transformers 5 keeps Gemma 3's that way): every one is checked
    (transformers.Gemma3TextConfig(**GQA, layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={
                                       "sliding_attention": dict(rope_type="default"),
                                       "full_attention": dict(rope_type="yarn", factor=8.0)}),
     None, "rope_parameters.rope_type='yarn'"),
    (transformers.LlamaConfig(**GQA, partial_rotary_factor=0.5), None,
     "partial_rotary_factor=0.5"),
    (transformers.LlamaConfig(**GQA, final_logit_softcapping=30.0), None,
     "final_logit_softcapping=30.0"),
    (transformers.Qwen3Config(**GQA, attn_logit_softcapping=50.0), None,
     "attn_logit_softcapping=50.0"),
    # Qwen2/3 and Qwen2-MoE slide only on the layers `layer_types` says (max_window_layers 0:
    # all of them here; the MoE one: every other layer).
    (transformers.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=64,
                              max_window_layers=0), 256, "sliding_window=64"),
    (transformers.Qwen3Config(**GQA, use_sliding_window=True, sliding_window=64,
                              max_window_layers=0), None, "sliding_window=64"),
    (transformers.Qwen2MoeConfig(**GQA, use_sliding_window=True, sliding_window=64), 65,
     "sliding_window=64"),
    (transformers.LlamaConfig(**GQA, mlp_bias=True), None, "mlp_bias=True"),
    (transformers.OPTConfig(**SMALL, layer_norm_elementwise_affine=False), None,
     "layer_norm_elementwise_affine=False"),
    (transformers.GPT2Config(**SMALL, scale_attn_by_inverse_layer_idx=True), None,
     "scale_attn_by_inverse_layer_idx=True"),
    (transformers.GPT2Config(**SMALL, reorder_and_upcast_attn=True), None,
     "reorder_and_upcast_attn=True"),
    (transformers.GPT2Config(**SMALL, add_cross_attention=True), None,
     "add_cross_attention=True"),
    (transformers.Qwen2MoeConfig(**GQA, qkv_bias=False), None, "qkv_bias=False"),
]


@pytest.mark.parametrize("config,max_model_len,field", REFUSED,
                         ids=[f for _, _, f in REFUSED])
def test_unsupported_field_is_refused_by_name(config, max_model_len, field):
    with pytest.raises(ValueError, match=re.escape(f"config field {field} is not supported")):
        get_model_class(config, max_model_len)


ACCEPTED = [
    # A window the context never reaches changes nothing.
    (transformers.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=64,
                              max_window_layers=0), 64),
    # Switched off, or on for no layer (max_window_layers past the last layer), as HF does.
    (transformers.Qwen2Config(**GQA, use_sliding_window=False, sliding_window=64), None),
    (transformers.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=64), None),
    (transformers.Qwen2MoeConfig(**GQA, use_sliding_window=False), None),
    # Implemented (tests/models/test_parity.py runs both with a window of 32).
    (transformers.Phi3Config(**GQA, sliding_window=2047), None),
    (transformers.MixtralConfig(**GQA, sliding_window=64), None),
    (transformers.LlamaConfig(**GQA, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), None),
    (transformers.GPT2Config(**SMALL, activation_function="gelu"), None),
    # Mistral declares nothing yet: its sliding window belongs to the sliding-window work.
    (transformers.MistralConfig(**GQA, sliding_window=64), 256),
]


@pytest.mark.parametrize("config,max_model_len", ACCEPTED,
                         ids=[type(c).__name__ for c, _ in ACCEPTED])
def test_supported_configs_load(config, max_model_len):
    get_model_class(config, max_model_len)


def test_default_gguf_model_config_passes():
    from pagedllm.loader import default_model_path, load_model_config

    config = load_model_config(default_model_path(), "gguf")
    assert get_model_class(config, 2048).__name__ == "LlamaForCausalLM"


def test_engine_refuses_at_load_naming_the_field(family_checkpoint, tmp_path):
    """Through LLM(...): the check runs where the engine builds the model."""
    path, _ = family_checkpoint("phi3")
    config = json.load(open(f"{path}/config.json"))
    bad = tmp_path / "phi3-longrope"
    bad.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).symlink_to(f"{path}/{f}")
    json.dump(config | {"rope_scaling": LONGROPE, "rope_parameters": LONGROPE},
              open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        LLM(str(bad), cpu_kv_cache_gib=0.05, swap_space=0.05)


def test_untied_config_without_lm_head_is_refused(family_checkpoint, tmp_path):
    """Qwen3's checkpoint ties its head, so it holds no lm_head.weight; a config that says
    tie_word_embeddings=false would otherwise leave the head random."""
    path, _ = family_checkpoint("qwen3")
    config = json.load(open(f"{path}/config.json"))
    assert config["tie_word_embeddings"] is True
    bad = tmp_path / "qwen3-untied"
    bad.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (bad / f).symlink_to(f"{path}/{f}")
    json.dump(config | {"tie_word_embeddings": False}, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings=False"):
        LLM(str(bad), cpu_kv_cache_gib=0.05, swap_space=0.05)
