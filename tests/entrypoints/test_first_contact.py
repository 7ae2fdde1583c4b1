"""A new user's first five minutes: what `pagedllm serve` / `chat` print and refuse, through
real processes on loopback.

- a port in use, a model that is not there, a Hub id without network: one line that says what
  to do, exit status 1, before the model loads (no traceback unless --log-level debug);
- vLLM's flags: --version, --enable-prefix-caching / --no-..., --chat-template;
  GET /v1/models/{id} through the `openai` client;
- start-up says what it is doing; `pagedllm chat` keeps the stats line out of the answer.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from pagedllm.engine.arg_utils import EngineArgs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "pagedllm.entrypoints.cli"]
# Lines of the start-up phases (those up to the first that reads the model).
LOAD_LINES = ("reading the model config of", "loading the tokenizer of", "loading the model")


def run_cli(*args: str, env: dict | None = None, timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})}, timeout=timeout, input=stdin)


def error_lines(stderr: str) -> list[str]:
    """stderr without the INFO/DEBUG log lines (the start-up phases)."""
    return [line for line in stderr.splitlines()
            if line.strip() and " INFO " not in line and " DEBUG " not in line]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("pagedllm serve: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- refused before the model loads, in one line ---------------------------------------------
def test_port_in_use_fails_before_the_load():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port))
    assert_one_line_error(proc, f"port {port} is already in use", "--port")
    assert not any(phase in proc.stderr for phase in LOAD_LINES), proc.stderr


def test_missing_model_path_is_one_line(caplog):
    proc = run_cli("serve", "--model", "/nonexistent/model.gguf", "--port", "0")
    assert_one_line_error(proc, "'/nonexistent/model.gguf' is neither a file or directory",
                          "pass a .gguf file")
    with caplog.at_level(logging.DEBUG, logger="pagedllm"):  # the traceback, for bug reports
        message = serve_error("--model", "/nonexistent/model.gguf", "--log-level", "debug")
    assert "debug shows the traceback" not in message
    assert any(r.exc_info and r.exc_info[0] is FileNotFoundError for r in caplog.records)


def test_hub_id_without_network_is_one_line(tmp_path, monkeypatch):
    # Not in the (empty) cache; downloads go to a closed port on loopback, as with no network.
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("serve", "tiny-org/absent", "--port", "0", env=env)
    assert_one_line_error(proc, "tiny-org/absent is not in the Hugging Face cache",
                          "could not be downloaded", "hf download tiny-org/absent")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = serve_error("tiny-org/absent", "--download-dir", str(tmp_path))
    assert "HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message


def test_bad_chat_template_is_refused_before_the_load(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        missing = serve_error("--chat-template", str(tmp_path / "absent.jinja"))
        broken = serve_error("--chat-template", "{% for m in messages %}{{ m")
    assert "absent.jinja" in missing and "no such file" in missing
    assert "Jinja syntax error on line 1" in broken
    assert not any(phase in caplog.text for phase in LOAD_LINES), caplog.text


def serve_error(*args: str) -> str:
    """`pagedllm serve ARGS` in this process, which must exit with an error: its one line.
    (The logging level main() sets, here and for spawned processes, is put back after.)"""
    from pagedllm.entrypoints.cli import main

    pkg, env = logging.getLogger("pagedllm"), os.environ.get("PAGEDLLM_LOGGING_LEVEL")
    level = pkg.level
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--port", "0", *args])
    finally:
        pkg.setLevel(level)
        if env is None:
            os.environ.pop("PAGEDLLM_LOGGING_LEVEL", None)
        else:
            os.environ["PAGEDLLM_LOGGING_LEVEL"] = env
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("pagedllm serve: error: ")
    assert "\n" not in message
    return message


# ---- vLLM's flags ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"], ["chat", "--version"]])
def test_version(argv, capsys):
    from pagedllm import __version__
    from pagedllm.entrypoints.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"pagedllm {__version__}\n"


@pytest.mark.parametrize(("flags", "expected"), [
    ([], None), (["--enable-prefix-caching"], True), (["--no-enable-prefix-caching"], False)])
def test_enable_prefix_caching_flags(flags, expected):
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(flags))
    assert args.enable_prefix_caching is expected


def test_load_chat_template(tmp_path):
    from pagedllm.entrypoints.chat_utils import load_chat_template

    inline = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert load_chat_template(str(path)) == inline
    assert load_chat_template(inline) == inline
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "absent.jinja"))
    with pytest.raises(ValueError, match="Jinja syntax error"):
        load_chat_template("{% if %}")


# ---- a real server: --chat-template, models.retrieve, the ready line --------------------------
TEMPLATE = ("{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


@pytest.fixture(scope="module")
def templated_server(tmp_path_factory):
    from tests.entrypoints.test_openai_server import serving

    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    yield from serving("--chat-template", str(path))


@pytest.mark.slow
def test_chat_template_renders_chat_requests(templated_server):
    import httpx
    import openai

    from pagedllm.loader import default_model_path, load_tokenizer
    from tests.entrypoints.test_openai_server import API_KEY, MODEL

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."}]
    tokenizer = load_tokenizer(default_model_path())
    ours = tokenizer("[SYSTEM] Be brief.\n[USER] Name a colour.\n[ASSISTANT] ",
                     add_special_tokens=False)["input_ids"]
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ours != theirs  # the model's own template would give other ids
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(f"{templated_server.url}/tokenize", headers=headers, timeout=60,
                        json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert tokens == ours
    client = openai.OpenAI(base_url=f"{templated_server.url}/v1", api_key=API_KEY,
                           max_retries=0, timeout=60)
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                          temperature=0)
    assert resp.usage.prompt_tokens == len(ours)


@pytest.mark.slow
def test_models_retrieve_and_start_up_lines(templated_server):
    import openai

    from tests.entrypoints.test_openai_server import API_KEY, MODEL

    client = openai.OpenAI(base_url=f"{templated_server.url}/v1", api_key=API_KEY,
                           max_retries=0, timeout=60)
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "pagedllm")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and MODEL in err.value.body["message"]
    # Start-up said what it was doing: each phase when it began and how long it took.
    templated_server.log.seek(0)
    log = templated_server.log.read().decode(errors="replace")
    gguf = re.escape("SmolLM2-135M-Instruct.Q4_1.gguf")
    for phase in LOAD_LINES:
        assert re.search(rf"{phase} {gguf} \.\.\.$", log, re.MULTILINE), log
        assert re.search(rf"{phase} {gguf}: \d+\.\d s$", log, re.MULTILINE), log
    assert "KV cache" in log and "(the default; --model picks another)" in log
    ready = rf"ready in \d+\.\d s: serving {MODEL} on http://127\.0\.0\.1:\d+/v1$"
    assert re.search(ready, log, re.MULTILINE), log


# ---- pagedllm chat ---------------------------------------------------------------------------
@pytest.mark.slow
def test_chat_keeps_stats_out_of_the_answer():
    """With a stats line due every step, the terminal (stdout and stderr together) shows none
    between the prompt and the end of the answer; --log-level debug shows them."""
    env = {"PAGEDLLM_LOG_STATS_INTERVAL_S": "0"}
    args = ("chat", "--max-tokens", "12", "--temperature", "0", "--max-model-len", "256",
            "--cpu-kv-cache-gib", "0.05", "--swap-space", "0")

    def terminal(*extra: str) -> str:
        proc = subprocess.run([*CLI, *args, *extra], cwd=ROOT, env={**os.environ, **env}, check=False,
                              input="Say hi.\nAnd again.\n\n", text=True, timeout=300,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.returncode == 0, proc.stdout[-3000:]
        return proc.stdout

    out = terminal()
    answers = out.split("> ", 1)[1]
    assert answers.count("> ") == 2 and answers.strip(), out  # two turns, then the empty line
    assert "throughput" not in out, out
    assert "throughput" in terminal("--log-level", "debug")  # the stats were due
