"""One request must never take the server down: each payload below once crashed the engine
core, overflowed a tensor, cost hundreds of MiB or answered a 500. Each must now be a 400 (or
415) naming the field, after which the same server answers a normal request exactly as it did
before any bad input (the oracle: the server against itself).

One real `pagedllm serve` with the tiny random Llama (SmolLM2's tokenizer, vocab 49152).
"""

from __future__ import annotations

import json
import time

import pytest

from pagedllm.entrypoints.openai.protocol import (
    MAX_JSON_DEPTH, MAX_PROMPTS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, APIError, parse_json,
)
from pagedllm.sampling_params import MAX_N, MAX_SEED
from tests.conftest import TINY_LLAMA
from tests.entrypoints.test_openai_server import API_KEY, assert_error, serving

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

VOCAB = TINY_LLAMA["vocab_size"]
MAX_BODY = 4_000_000
NORMAL = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving("--model", tiny_llama_dir, "--max-model-len", "512",
                       "--cpu-kv-cache-gib", "0.05", "--swap-space", "0.05",
                       "--max-request-body-bytes", str(MAX_BODY))


@pytest.fixture(scope="module")
def baseline(http) -> dict:
    """The normal request's answer before any bad input reached the server."""
    resp = http.post("/v1/completions", json=NORMAL)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


@pytest.fixture
def still_serves(server, http, baseline):
    """After the test's bad requests: healthy, and the normal request answers as before."""
    yield
    assert http.get("/health").status_code == 200
    resp = http.post("/v1/completions", json=NORMAL)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (baseline["text"], "length")
    assert "Traceback" not in server.output()


def post_raw(http, path: str, text: str, content_type: str | None = "application/json"):
    """Send `text` as is: httpx's json= would refuse NaN and lone surrogates client-side."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    return http.post(path, content=text.encode("utf-8", "surrogatepass"), headers=headers)


def bad(http, body: dict, field: str, path: str = "/v1/completions") -> dict:
    err = assert_error(http.post(path, json={"prompt": "hi", **body}), 400, field)
    assert err["param"] == field, err
    return err


# ---- 1. logit-indexing ids checked against the real vocabulary ---------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("bad_id", [VOCAB, 10**9, 2**63, 2**64])
def test_stop_token_ids_outside_vocab_with_min_tokens(http, bad_id):
    err = bad(http, {"min_tokens": 2, "stop_token_ids": [5, bad_id]}, "stop_token_ids")
    assert f"[0, {VOCAB})" in err["message"]


@pytest.mark.usefixtures("still_serves")
def test_stop_token_id_inside_vocab_with_min_tokens_runs(http):
    body = {**NORMAL, "min_tokens": 2, "stop_token_ids": [VOCAB - 1]}
    assert http.post("/v1/completions", json=body).status_code == 200


# ---- 2. ints past int64, and seeds past the generator's range ----------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("top_k", [2**63, 2**70, VOCAB + 1])
def test_top_k_beyond_vocab(http, top_k):
    err = bad(http, {"top_k": top_k, "temperature": 1.0}, "top_k")
    assert f"[1, {VOCAB}]" in err["message"]


@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("seed", [2**64 - 1, 2**63, MAX_SEED + 1, -(2**63) - 1])
def test_seed_beyond_int64_with_n(http, seed):
    err = bad(http, {"seed": seed, "n": 2, "temperature": 1.0}, "seed")
    assert "seed + i" in err["message"]


@pytest.mark.usefixtures("still_serves")
def test_bounds_themselves_are_accepted(http):
    body = {**NORMAL, "temperature": 1.0, "top_k": VOCAB, "seed": MAX_SEED, "n": 2}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 2


# ---- 3. what one request may cost ---------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("n", [MAX_N + 1, 10**6])
def test_n_is_capped(http, n):
    assert f"[1, {MAX_N}]" in bad(http, {"n": n}, "n")["message"]


@pytest.mark.usefixtures("still_serves")
def test_n_is_capped_in_chat(http):
    resp = http.post("/v1/chat/completions",
                     json={"messages": [{"role": "user", "content": "hi"}], "n": MAX_N + 1})
    assert assert_error(resp, 400, f"[1, {MAX_N}]")["param"] == "n"


@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("body,fragment", [
    ({"prompt": ["hi"] * (MAX_PROMPTS + 1)}, f"at most {MAX_PROMPTS} prompts"),
    ({"prompt": [[5, 6]] * (MAX_PROMPTS + 1)}, f"at most {MAX_PROMPTS} prompts"),
    ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, f"at most {MAX_STOP_STRINGS}"),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, f"at most {MAX_STOP_STRING_CHARS} characters"),
    ({"stop_token_ids": [5] * 257}, "at most 256 items"),
])
def test_request_size_is_capped(http, body, fragment):
    field = next(iter(body))
    assert fragment in bad(http, body, field)["message"]


# ---- 4. nesting ---------------------------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
def test_deep_nesting_is_400_without_traceback(http, depth):
    text = '{"prompt": "hi", "user": ' + "[" * depth + "]" * depth + "}"
    assert_error(post_raw(http, "/v1/completions", text), 400, "nests deeper than")


# ---- 5. lone surrogates -------------------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": "\ud800"}, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop[0]"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content"),
])
def test_lone_surrogate_is_400_naming_the_field(http, path, body, field):
    err = assert_error(post_raw(http, path, json.dumps(body)), 400, f"'{field}'", "surrogate")
    assert err["param"] == field


# ---- 6. non-finite numbers ----------------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("field,literal", [
    ("temperature", "NaN"), ("top_p", "Infinity"), ("presence_penalty", "-Infinity"),
    ("repetition_penalty", "1e999"), ("temperature", "-1e400"),
])
def test_non_finite_number_is_400(http, field, literal):
    text = f'{{"prompt": "hi", "{field}": {literal}}}'
    err = assert_error(post_raw(http, "/v1/completions", text), 400, f"'{field}'", literal)
    assert err["param"] == field


@pytest.mark.usefixtures("still_serves")
def test_temperature_beyond_float32_is_400(http):
    # Finite in float64, inf in the sampler's float32 (and -inf / inf is NaN).
    bad(http, {"temperature": 1e300, "min_tokens": 1}, "temperature")


# ---- 7. repetition_penalty ----------------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("penalty", [1e-45, 1e-3, 1e3])
def test_repetition_penalty_out_of_range(http, penalty):
    assert "[0.01, 100]" in bad(http, {"repetition_penalty": penalty}, "repetition_penalty")[
        "message"]


@pytest.mark.usefixtures("still_serves")
def test_repetition_penalty_at_its_bound_generates(http):
    resp = http.post("/v1/completions", json={**NORMAL, "repetition_penalty": 0.01})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == NORMAL["max_tokens"]


# ---- 8. Content-Type ----------------------------------------------------------------------------
@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_non_json_content_type_is_415(http, content_type):
    resp = post_raw(http, "/v1/completions", json.dumps(NORMAL), content_type)
    err = assert_error(resp, 415, "Content-Type must be application/json",
                       content_type.split(";")[0])
    assert err["code"] == "unsupported_media_type"


@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("content_type", [None, "application/json",
                                          "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_content_types_are_served(http, baseline, content_type):
    resp = post_raw(http, "/v1/completions", json.dumps(NORMAL), content_type)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == baseline["text"]


@pytest.mark.usefixtures("still_serves")
def test_openai_client_still_served(server, baseline):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                           timeout=60)
    resp = client.completions.create(model=client.models.list().data[0].id, **{
        k: v for k, v in NORMAL.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
    assert resp.choices[0].text == baseline["text"]
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=resp.model, prompt="hi", n=2, seed=2**64 - 1)


# ---- parse_json alone ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,param,fragment", [
    ('{"a": {"b": [1, NaN]}}', "a.b[1]", "NaN is not a finite number"),
    ('{"a": "\\ud800"}', "a", "surrogate"),
    ('{"\\ud800": 1}', None, "field name"),
    ("[" * 5000 + "]" * 5000, None, "nests deeper than"),
    ('{"a": 1', None, "not valid JSON"),
    ("[1]", None, "must be a JSON object"),
])
def test_parse_json_rejects(text, param, fragment):
    with pytest.raises(APIError, match=fragment) as info:
        parse_json(text.encode("utf-8", "surrogatepass"))
    assert (info.value.status, info.value.param) == (400, param)


def test_parse_json_keeps_valid_bodies():
    text = '{"p": "caf\\u00e9 \\ud83d\\ude00", "x": [1.5, -2e10, 3], "d": ' + \
        "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_json(text.encode())["p"] == "café 😀"


@pytest.mark.usefixtures("still_serves")
def test_body_over_the_cap_is_413_declared_or_streamed(http):
    big = json.dumps({**NORMAL, "prompt": "a" * (MAX_BODY + 10)}).encode()
    resp = http.post("/v1/completions", content=big,
                     headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "--max-request-body-bytes" in resp.text

    def chunks():  # no Content-Length: the cap must hold while reading
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]
    resp = http.post("/v1/completions", content=chunks(),
                     headers={"Content-Type": "application/json"})
    assert resp.status_code == 413


@pytest.mark.usefixtures("still_serves")
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**NORMAL, "prompt": "word " * 300_000}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 300_000}],
                              "max_tokens": 4}, "messages"),
    ("/tokenize", {"prompt": "word " * 300_000}, "prompt"),
])
def test_overlong_text_is_refused_before_tokenizing(http, path, body, param):
    t0 = time.monotonic()
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and "characters" in err["message"]
    assert err["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 5  # 1.5M characters: not tokenized


def test_openapi_publishes_every_request_body(http):
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model, field in [("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/v1/completions", "CompletionRequest", "prompt"),
                               ("/tokenize", "TokenizeRequest", "prompt"),
                               ("/detokenize", "DetokenizeRequest", "tokens")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert field in components[model]["properties"]
    refs = set()

    def collect(node):  # every $ref in the document resolves
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
    collect(schema)
    assert refs and refs <= set(components)
