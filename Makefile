# Two commands do all the set-up (see README.md):
#   make run    -- create .venv, install, run the default simulation with `flwr run`
#   make test   -- create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_CONFIG ?=
# pytest-xdist workers: the end-to-end tests mostly wait on processes they start (SuperLinks, SuperNodes,
# Ray, round timeouts), so two workers overlap that waiting; --dist loadscope keeps each test file on one
# worker, so a file's module fixtures (one deployment, one rendering) start once
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

.PHONY: install run test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch==2.13.0 explicitly: the CPU wheel (a looser pin can pull a multi-GB CUDA build)
	$(PY) -m pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/fedavg-relu run $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not e2e and not slow"

# the headline comparison (packed vs pfl-research vs stock Flower at tau 1 and 5; <= 10 min on 2 cores),
# then the pages that render it; benchmarks/drift_overhead.py and benchmarks/scale.py run by themselves
bench: install
	$(PY) benchmarks/headline.py
	$(PY) scripts/render_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
