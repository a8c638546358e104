# The two commands of the README: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup setup-eval setup-awq demo test bench clean
unexport PYTHONDONTWRITEBYTECODE

setup: $(STAMP)

# The suite runs everything it can here: the judge (torch CPU + lm-eval), Ray and llama.cpp (prebuilt) included.
# --no-compile: pip would byte-compile every module of every package (torch, Ray, scipy...; minutes
# of CPU, docs/benchmarks.md, most of it never imported); Python compiles what is imported, once, on first use,
# and keeps it: PYTHONDONTWRITEBYTECODE (set in some sandboxes) is unset for every target here.
$(STAMP): pyproject.toml setup.py src/nearswap/_ckernel.c src/nearswap/_dequant.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade pip setuptools wheel
	$(BIN)/pip install -q --no-compile -e '.[dev,judge,ray,llama]'
	$(BIN)/python -c "import nearswap.core.kernels as k; print('nearswap kernel:', k.describe_backend())"
	touch $(STAMP)

# export --format awq: llm-compressor in an environment of its own (it pins an older transformers
# than the judge's). Then: .venv-awq/bin/nearswap export MODEL --format awq --text FILE -o OUT;
# its tests: .venv-awq/bin/python -m pytest tests/test_awq.py
AWQ_VENV := .venv-awq

setup-awq:
	test -x $(AWQ_VENV)/bin/python || $(PY) -m venv $(AWQ_VENV)
	$(AWQ_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(AWQ_VENV)/bin/pip install -q -e '.[awq,dev]'

# (kept for older checkouts' habits: the judge extra is installed by setup)
setup-eval: setup

demo: setup
	$(BIN)/nearswap demo

# Two test processes, each running whole files (module fixtures such as a Ray cluster or a
# converted model are made once): the suite waits on subprocesses and downloads as much as on CPU.
# Files are handed out in the order tests/conftest.py gives them (the longest first);
# --no-loadscope-reorder: xdist would otherwise hand out the files with the most tests first,
# which put the few-but-slow files (Ray, SmolLM2, tune) last, one process working alone at the end.
TEST_WORKERS ?= 2

# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep at a barrier instead of spinning, which on
# two cores shared by two test processes (and their subprocesses) burns the time the other needs.
# Thread counts and results are unchanged.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) $(AWQ_VENV) build src/*.egg-info src/nearswap/*.so
