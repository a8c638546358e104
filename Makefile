# The two commands of the README: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: setup setup-eval demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py src/nearswap/_ckernel.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -c "import nearswap.kernels as k; print('nearswap kernel:', k.describe_backend())"
	touch $(STAMP)

# The eval extra (torch 2.13.0 CPU + transformers) lets the demo write and score stories.
setup-eval: $(EVAL_STAMP)

$(EVAL_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,eval]'
	touch $(EVAL_STAMP)

demo: setup-eval
	$(BIN)/nearswap demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/nearswap/*.so
