"""Structured output inside the engine, against the engine itself: seeded constrained requests
(n=2) give the same tokens alone in a roomy engine and batched with plain requests under forced
preemption (recompute and swap), prefix-cache hits and async scheduling. A matcher advanced twice
by a recomputed prefill, or shared between the n samples, would change the tokens (or trip the
count assert in core_state.advance_matcher)."""

from __future__ import annotations

import json

import pytest

from pagedllm import LLM
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "n": {"type": "integer", "minimum": 0, "maximum": 9999},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 4}},
    "required": ["name", "n", "tags"], "additionalProperties": False}
PROMPTS = ["Write a record: " + "word " * k for k in (3, 20, 3, 40)]  # shared prefixes


def structured(seed: int) -> SamplingParams:
    return SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=150, structured_outputs=
                          StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))


def plain(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True)


def run(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[list[int]]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[o.token_ids for o in out.outputs] for out in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir, max_model_len=512, cpu_kv_cache_gib=0.05, swap_space=0.05,
              enable_prefix_caching=False, async_scheduling=False)
    expected = [run(llm, [p], [structured(i)])[0] for i, p in enumerate(PROMPTS)]
    texts = [[llm.get_tokenizer().decode(t, skip_special_tokens=True) for t in seqs]
             for seqs in expected]
    llm.llm_engine.shutdown()
    return expected, texts


def test_reference_outputs_validate(reference):
    for seqs in reference[1]:
        assert seqs[0] != seqs[1]  # each sample its own matcher and generator
        for text in seqs:
            jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_same_tokens_under_preemption_prefix_cache_and_async(tiny_llama_dir, reference, mode):
    llm = LLM(model=tiny_llama_dir, max_model_len=512, cpu_kv_cache_gib=0.05, swap_space=0.05,
              num_gpu_blocks_override=14, preemption_mode=mode, enable_prefix_caching=True,
              async_scheduling=True)
    prompts = PROMPTS + PROMPTS[:2]  # plain requests on the same prefixes, interleaved
    params = [structured(i) for i in range(len(PROMPTS))] + [plain(0), plain(1)]
    got = run(llm, prompts, params)
    assert got[:len(PROMPTS)] == reference[0]
    metrics = llm.get_metrics()
    assert metrics["num_preemptions_total"] > 0 and metrics["prefix_cache_hits_total"] > 0
    assert llm.llm_engine.check_integrity()
    llm.llm_engine.shutdown()


def test_closed_objects_admit_only_declared_keys():
    """Objects that say nothing about other keys get additionalProperties false (vLLM's default
    engine admits only declared keys); open ones, allOf members and data stay as written."""
    from pagedllm.engine.structured_output import closed_objects

    item = {"type": "object", "properties": {"a": {"type": "integer"}}}
    schema = {"type": "object", "properties": {
        "x": item, "y": {"type": "array", "items": item},
        "z": {"anyOf": [item, {"type": "null"}]},
        "open": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
        "both": {"allOf": [item, {"properties": {"b": {}}}]},
        "data": {"const": {"properties": {"k": 1}}}},
        "$defs": {"d": item}}
    out = closed_objects(schema)
    closed = {**item, "additionalProperties": False}
    assert out["additionalProperties"] is False and out["$defs"]["d"] == closed
    props = out["properties"]
    assert props["x"] == closed and props["y"]["items"] == closed
    assert props["z"]["anyOf"] == [closed, {"type": "null"}]
    assert props["open"]["additionalProperties"] == {"type": "string"}
    assert props["both"] == {"allOf": [item, {"properties": {"b": {}}}]}
    assert props["data"] == {"const": {"properties": {"k": 1}}}
    assert schema["properties"]["x"] == item  # the caller's schema is not changed
