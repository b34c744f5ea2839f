# minillm: `make demo` sets up and runs the main job on the real model; `make test` runs the tests.
# Also: `make test-fast` (no real weights needed), `make fuzz` (the file readers under a fuzz
# campaign), `make lint`, `make compare` (benchmarks).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := weights/smollm2-135m-instruct.safetensors
STDLIB  = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

.PHONY: demo test test-fast fuzz lint weights install clean bench-env compare

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

# tests add transformers + torch (CPU) as the oracle; the runtime never needs them
$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.lint-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[lint]'
	touch $@

install: $(VENV)/.installed

$(MODEL): $(VENV)/.installed
	bash weights/build_smollm2.sh $(BIN)/python

weights: $(MODEL)

demo: $(MODEL)
	@echo "== minillm score: the Python standard library's source read as one stream, well past the 8K training length =="
	cat $(STDLIB)/*.py | $(BIN)/minillm score $(MODEL) --max-tokens 20000 --progress
	@echo
	@echo "== minillm chat (piped: one answer) =="
	echo "What is the capital of France?" | $(BIN)/minillm chat $(MODEL) --temperature 0

test: $(VENV)/.test-installed $(MODEL)
	$(BIN)/python -m pytest -q

# everything but the tests that need the real SmolLM2 weights or its GGUF
test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m "not real_model"

# the readers under a long fuzz campaign (minutes): FUZZ_EXAMPLES inputs per reader, 2 processes;
# `make test` replays the crashes it keeps (tests/fuzz_corpus) and runs a few examples
FUZZ_EXAMPLES ?= 25000
fuzz: $(VENV)/.test-installed
	PYTHONPATH=tests $(BIN)/python -m fuzz --examples $(FUZZ_EXAMPLES) --real-gguf 50

lint: $(VENV)/.lint-installed
	$(BIN)/ruff check .

# the side-by-side benchmark (not part of CI): llama.cpp compiles into its own venv, once
BENCH_VENV := .bench-venv
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BENCH_VENV)/bin/pip install --quiet llama-cpp-python==0.3.36 numpy
	touch $@

bench-env: $(BENCH_VENV)/.installed

compare: $(VENV)/.test-installed $(MODEL) $(BENCH_VENV)/.installed
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/compare.py --out benchmarks/results/compare

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(MODEL) .pytest_cache build
