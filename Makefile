# `make demo`: set up .venv and run the embedded miniature world end to end (CPU, minutes).
# `make test`: set up .venv and run the test suite (CPU, offline).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/ruff check src tests benchmarks studies
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks studies

demo: setup
	$(VENV)/bin/smpo demo --output demo-output --overwrite

clean:
	rm -rf $(VENV) demo-output
