"""Weight loading paths beyond the transformers-saved checkpoints of test_parity.py."""

from __future__ import annotations

import pytest
import torch

from pagedllm.loader import initialize_dummy_weights, iter_weights, load_model_config
from pagedllm.models.registry import get_model_class

from .conftest import FAMILIES


def build(path: str) -> torch.nn.Module:
    config = load_model_config(path)
    return get_model_class(config)(config)


def original_names(family: str, weights):
    """The hub layout of the original GPT-2 / OPT checkpoints: saved from the base model (no
    `transformer.` / `model.` prefix), GPT-2 with its causal-mask buffers beside the weights."""
    for name, tensor in weights:
        if family == "gpt2":
            name = name.removeprefix("transformer.")
            if name.endswith("attn.c_attn.weight"):
                yield name.replace("c_attn.weight", "bias"), torch.ones(1, 1, 8, 8)
        else:
            name = name.removeprefix("model.")
        yield name, tensor


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_original_hub_names_load_the_same_weights(family_checkpoint, family):
    path, _ = family_checkpoint(family)
    config = load_model_config(path)
    expected, got = build(path), build(path)
    expected.load_weights(iter_weights(path, "safetensors", config))
    got.load_weights(original_names(family, iter_weights(path, "safetensors", config)))
    want = dict(expected.named_parameters())
    for name, param in got.named_parameters():
        assert torch.equal(param, want[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_weights_fill_every_parameter(family_checkpoint, family):
    """load_format="dummy" goes through every layer's full_shards + weight_loader."""
    model = build(family_checkpoint(family)[0])
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    initialize_dummy_weights(model, seed=1)
    for name, param in model.named_parameters():
        assert not param.isnan().any(), name
