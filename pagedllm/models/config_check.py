"""Refuse, at load, a config whose math a model class does not implement.

A HF config can ask for things that change every logit: another activation, a RoPE scaling
type, soft-capped logits, a sliding attention window. Ignoring one gives a model that runs and
answers wrongly, so each model class declares what it implements (`supports = Supports(...)`)
and `check_config` names the first field it does not, with its value.

NOTE: a declaration belongs to the class that writes it and is not inherited: a subclass may
change exactly what its parent declared (Mistral's sliding window on top of Llama). A class
that declares nothing is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.config import layer_sliding_windows
from pagedllm.layers.rotary import partial_rotary_factor, rope_config

_SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")


@dataclass(frozen=True)
class Supports:
    activations: tuple[str, ...]  # values of hidden_act / activation_function
    rope_types: tuple[str, ...] = ()  # () for a family without RoPE
    partial_rotary: bool = False  # partial_rotary_factor < 1
    sliding_window: bool = False
    softcapping: bool = False
    # Other fields the code assumes, with the value it assumes ((field, value), ...); a config
    # without the field passes.
    assumes: tuple[tuple[str, object], ...] = ()


def check_config(cls: type, hf_config, max_model_len: int | None = None) -> None:
    """Raise ValueError naming the first config field `cls` does not implement."""
    supports: Supports | None = vars(cls).get("supports")
    if supports is None:
        return
    name = cls.__name__

    def refuse(field: str, value, why: str) -> None:
        raise ValueError(f"{name}: config field {field}={value!r} is not supported ({why})")

    for field in ("hidden_act", "activation_function"):
        act = getattr(hf_config, field, None)
        if act is not None and act not in supports.activations:
            refuse(field, act, f"supported: {', '.join(supports.activations)}")

    if supports.rope_types:
        field = "rope_parameters" if getattr(hf_config, "rope_parameters", None) \
            else "rope_scaling"
        for kind in rope_types(hf_config):
            if kind not in supports.rope_types:
                refuse(f"{field}.rope_type", kind,
                       f"supported: {', '.join(supports.rope_types)}")
        factor = partial_rotary_factor(hf_config)
        if factor != 1.0 and not supports.partial_rotary:
            refuse("partial_rotary_factor", factor, "this family rotates whole heads")

    if not supports.softcapping:
        for field in _SOFTCAPS:
            if getattr(hf_config, field, None):
                refuse(field, getattr(hf_config, field), "logits are not soft-capped here")

    windows = [w for w in layer_sliding_windows(hf_config) if w is not None]
    window = min(windows, default=None)
    if window is not None and not supports.sliding_window and (
            max_model_len is None or max_model_len > window):
        refuse("sliding_window", window, "attention here sees the whole context; a window "
               f"changes nothing only if max_model_len <= {window}"
               + (f", and it is {max_model_len}" if max_model_len else ""))

    for field, value in supports.assumes:
        if hasattr(hf_config, field) and getattr(hf_config, field) != value:
            refuse(field, getattr(hf_config, field), f"only {value!r} is implemented")



def rope_types(hf_config) -> list[str]:
    """The RoPE type of each kind of layer: one, or one per layer type when transformers keeps
    `rope_parameters` per layer type (Gemma 3: {"sliding_attention": {...}, ...})."""
    params = getattr(hf_config, "rope_parameters", None)
    if params and all(isinstance(p, dict) for p in params.values()):
        return [p.get("rope_type", "default") for p in params.values()]
    _, scaling = rope_config(hf_config)
    return [(scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))]
