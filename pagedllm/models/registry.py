"""HF architecture name -> model class."""

from __future__ import annotations

from torch import nn

from pagedllm.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}


def get_model_class(hf_config) -> type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    archs.append(_BY_MODEL_TYPE.get(getattr(hf_config, "model_type", ""), ""))
    for arch in archs:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
        f"supported: {sorted(_MODELS)}")


def supported_architectures() -> list[str]:
    return sorted(_MODELS)
