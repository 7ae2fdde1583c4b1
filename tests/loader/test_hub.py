"""Hub ids (ORG/NAME) resolve through a Hugging Face cache on disk; nothing is downloaded.

The cache is built by hand in huggingface_hub's layout (models--ORG--NAME/refs/<rev> holding a
commit hash, snapshots/<hash>/ the files), with the tiny Llama checkpoint in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pagedllm.loader.hub import is_hub_id, resolve_model

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tiny_llama_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / COMMIT)
    return cache


def test_a_cached_id_resolves_to_its_snapshot_and_loads(hub_cache, tiny_llama_dir):
    from pagedllm import LLM, SamplingParams

    snap = resolve_model(REPO, download_dir=str(hub_cache))
    assert snap == str(hub_cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT)
    assert resolve_model(REPO, revision="v1", download_dir=str(hub_cache)) == snap
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_id = LLM(REPO, download_dir=str(hub_cache), cpu_kv_cache_gib=0.05, swap_space=0.05)
    by_path = LLM(str(tiny_llama_dir), cpu_kv_cache_gib=0.05, swap_space=0.05)
    assert by_id.generate(["Hello there"], params)[0].outputs[0].token_ids == \
        by_path.generate(["Hello there"], params)[0].outputs[0].token_ids


def test_missing_ids_and_paths_say_what_to_do(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"tiny-org/absent is not in the Hugging Face "
                       r"cache .* HF_HUB_OFFLINE is set.*hf download tiny-org/absent"):
        resolve_model("tiny-org/absent", download_dir=str(hub_cache))
    with pytest.raises(FileNotFoundError, match="tiny-org/tiny-llama@nope is not in the"):
        resolve_model(REPO, revision="nope", download_dir=str(hub_cache))
    with pytest.raises(FileNotFoundError, match="neither a file or directory here nor"):
        resolve_model("./no/such/dir")
    with pytest.raises(ValueError, match="applies to Hub ids"):
        resolve_model(str(hub_cache), revision="main")
    assert is_hub_id(REPO) and not is_hub_id(str(hub_cache)) and not is_hub_id("a/b/c")


def test_trust_remote_code_is_refused():
    from pagedllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="never runs code from a checkpoint"):
        EngineArgs(model=REPO, trust_remote_code=True).create_engine_config()


def test_serve_takes_a_positional_hub_id_from_hf_home(hub_cache):
    """`pagedllm serve ORG/NAME` as `vllm serve` takes it, found under HF_HOME, served under
    its id; offline, so a cache miss could not silently download."""
    httpx = pytest.importorskip("httpx")
    from tests.entrypoints.test_openai_server import API_KEY, ServerProcess

    env = {**os.environ, "HF_HOME": str(hub_cache.parent), "HF_HUB_OFFLINE": "1"}
    server = ServerProcess(REPO, "--max-model-len", "256", "--cpu-kv-cache-gib", "0.05",
                           "--swap-space", "0.05", env=env)
    try:
        server.wait_ready()
        models = httpx.get(f"{server.url}/v1/models",
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in models["data"]] == [REPO]
    finally:
        server.stop()
    bad = subprocess.run([sys.executable, "-m", "pagedllm.entrypoints.cli", "serve",
                          "tiny-org/absent"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "HF_HUB_OFFLINE is set" in bad.stderr
