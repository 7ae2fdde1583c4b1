"""HF architecture name -> model class, checked against the config (models/config_check.py)."""

from __future__ import annotations

from torch import nn

from pagedllm.models.config_check import check_config
from pagedllm.models.gemma3 import Gemma3ForCausalLM
from pagedllm.models.gpt2 import GPT2LMHeadModel
from pagedllm.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from pagedllm.models.mixtral import MixtralForCausalLM
from pagedllm.models.opt import OPTForCausalLM
from pagedllm.models.phi3 import Phi3ForCausalLM
from pagedllm.models.qwen2_moe import Qwen2MoeForCausalLM
from pagedllm.models.qwen3 import Qwen3ForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "opt": "OPTForCausalLM",
                  "gpt2": "GPT2LMHeadModel", "gemma3_text": "Gemma3ForCausalLM"}


def get_model_class(hf_config, max_model_len: int | None = None) -> type[nn.Module]:
    """The class for `hf_config`; raises ValueError if the config asks for math it does not
    implement (at `max_model_len`, which decides whether a sliding window matters)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    archs.append(_BY_MODEL_TYPE.get(getattr(hf_config, "model_type", ""), ""))
    for arch in archs:
        if arch in _MODELS:
            check_config(_MODELS[arch], hf_config, max_model_len)
            return _MODELS[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
        f"supported: {sorted(_MODELS)}")


def supported_architectures() -> list[str]:
    return sorted(_MODELS)
