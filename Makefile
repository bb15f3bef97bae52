# fedsim: `make run` runs the quickstart experiment, `make test` runs the test suite (with
# the tests of the example plug-in examples/plugin-feddyn, which it installs). Both create
# .venv when it is missing. torch is pinned to the CPU build (2.13.0) and
# installed first, so no dependency pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsim-installed

.PHONY: run test bench-overhead bench-deploy docker-test clean

$(STAMP): pyproject.toml examples/plugin-feddyn/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,lm]"
	$(PY) -m pip install -q -e examples/plugin-feddyn
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedsim run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench-overhead: $(STAMP)
	$(PY) benchmarks/engine_overhead.py

bench-deploy: $(STAMP)
	$(PY) benchmarks/deploy_overhead.py

# Opt-in, not part of `make test`: needs a Docker engine (and root with debootstrap unless
# BASE_IMAGE names a base image with python3.11 and venv). Builds the image offline from a
# Debian base and local wheels, deploys the quickstart on docker/compose.host.yaml, checks
# the numbers against the simulation, tears the containers down, writes
# benchmarks/results/docker.json.
docker-test: $(STAMP)
	$(PY) docker/docker_test.py

clean:
	rm -rf runs .pytest_cache
