# One entry point for local runs and CI. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the project with its extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the demo's task files: ../shared/data where it exists, else the Hugging Face hub (out of
# reach: the demo says so and runs the embedded benchmark); `make demo DATA=path/to/data`
DATA ?= $(if $(wildcard ../shared/data),../shared/data,hub)

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,bench,backends,hf,quant,docs]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/lalora-curv demo --out runs/demo --data_dir $(DATA)

test: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $(VENV)/site  # no --quiet: it hides the warnings --strict fails on
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_backends.py
	$(PY) benchmarks/bench_approx.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_storage.py
	$(PY) benchmarks/bench_testbed.py
	$(PY) benchmarks/bench_realtext.py
	$(PY) benchmarks/bench_selfgen.py
	$(PY) benchmarks/bench_sequential.py --cs 0.01,1
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
