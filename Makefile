# fedsim: `make run` runs the quickstart experiment, `make test` runs the test suite.
# Both create .venv when it is missing. torch is pinned to the CPU build (2.13.0) and
# installed first, so no dependency pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsim-installed

.PHONY: run test bench-overhead clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedsim run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench-overhead: $(STAMP)
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf runs .pytest_cache
