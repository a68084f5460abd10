# natd — see README.md. Every target that needs the machine set up depends on `setup` (idempotent, quick).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-bpf test-lab lint typecheck bench install uninstall clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m natd_lab.demo

test: setup
	bash scripts/check-unit.sh
	$(VENV)/bin/ruff check natd netns-lab tests
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-bpf: setup
	$(PY) -m pytest -m bpf $(PYTEST_ARGS)

test-lab: setup
	$(PY) -m pytest -m lab $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check natd netns-lab tests

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench.run

install: setup
	bash scripts/install.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
