"""Structured output with the real default model (SmolLM2-135M-Instruct), flexible whitespace
(the default): seeded samples at temperature 1.0, n=2, all valid against the schema."""

from __future__ import annotations

import json

import pytest

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow  # loads the default model

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "country": {"type": "string", "maxLength": 30},
    "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"], "additionalProperties": False}


def test_default_model_json_schema_samples_validate(default_llm):
    prompt = default_llm.encode_chat([{"role": "user", "content":
                                       "Give a large city as JSON with its country and "
                                       "population in millions."}])
    params = [SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA))
              for seed in range(4)]
    outs = default_llm.generate([{"prompt_token_ids": prompt}] * len(params), params,
                                use_tqdm=False)
    texts = [o.text for out in outs for o in out.outputs]
    for out in outs:
        for o in out.outputs:
            assert o.finish_reason == "stop", o.text
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len(set(texts)) > 1
