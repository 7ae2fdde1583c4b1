"""generation_config.json defaults apply as vLLM applies them (`--generation-config auto`): to
requests that leave the field unset, offline and in the server; `vllm` ignores the file."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.loader.generation_config import generation_defaults

ENGINE = dict(cpu_kv_cache_gib=0.05, swap_space=0.05, max_model_len=256)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(tiny_llama_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.0, top_p=0.5, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_defaults_are_read_from_the_file(model_dir, tiny_llama_dir):
    assert generation_defaults(str(model_dir)) == {"temperature": 0.0, "top_p": 0.5,
                                                   "max_tokens": 5}
    assert generation_defaults(str(model_dir), "vllm") == {}
    assert generation_defaults(str(tiny_llama_dir), str(model_dir))["max_tokens"] == 5
    with pytest.raises(FileNotFoundError, match="no generation_config.json"):
        generation_defaults(str(model_dir), str(model_dir / "absent"))


def test_offline_defaults_and_their_override(model_dir):
    llm = LLM(str(model_dir), **ENGINE)
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.max_tokens) == (0.0, 5)  # (greedy resets top_p)
    out = llm.generate([PROMPT])[0].outputs[0]
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert out.token_ids == greedy.token_ids and len(out.token_ids) == 5
    plain = LLM(str(model_dir), generation_config="vllm", **ENGINE)
    assert plain.get_default_sampling_params().temperature == 1.0


def test_server_applies_them_to_unset_fields(model_dir):
    httpx = pytest.importorskip("httpx")
    from tests.entrypoints.test_openai_server import API_KEY, serving

    gen = serving("--model", str(model_dir), "--max-model-len", "256",
                  "--cpu-kv-cache-gib", "0.05", "--swap-space", "0.05")
    server = next(gen)
    try:
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            def complete(**fields):
                resp = http.post("/v1/completions", json={"prompt": PROMPT, **fields})
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]

            # temperature 0 and 5 tokens from the file: two calls agree, and equal greedy.
            a, b = complete(), complete()
            greedy = complete(temperature=0, max_tokens=5)
            assert a["text"] == b["text"] == greedy["text"]
            assert a["finish_reason"] == "length"
            assert http.post("/v1/completions", json={"prompt": PROMPT}).json()[
                "usage"]["completion_tokens"] == 5
            assert complete(max_tokens=2)["text"] != a["text"]  # a smaller max_tokens wins
            assert complete(max_tokens=50)["text"] == a["text"]  # the file caps (vLLM's rule)
            assert complete(temperature=1.0, seed=3)["text"] != a["text"]
            chat = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}]}).json()
            assert chat["usage"]["completion_tokens"] == 5
    finally:
        gen.close()
